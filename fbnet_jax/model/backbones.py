"""Convolutional backbones: image [B, H, W, 3] in [-1, 1] -> features [B, D].

`vgg_face` is the paper's network (13 conv 3x3 + 5 max-pool, fc 4096, fc 4096, dropout 0.5).
`resnet50` is torchvision's ResNet-50 trunk, named so that its weights import by renaming.
`small_cnn` is a fast BatchNorm CNN for CPU demos and tests. Its BatchNorm is `nn.BatchNorm` as
one multiply-add (`BatchNorm`; ResNet-50 keeps `nn.BatchNorm`, see `BatchNorm`); the 2x2 pools
are a reshape and a max with an elementwise gradient (`_pool`); ResNet's 3x3 pool is
`nn.max_pool` with keyword arguments, because jax2onnx patches it with a keyword-only
`window_shape`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _windows(x):
    """x [B, H, W, C] as [B, H/2, 2, W/2, 2, C]: its 2x2 windows (an odd last row or column
    dropped)."""
    b, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def _pool(x):
    """2x2 max-pool with stride 2 ("VALID": an odd last row or column is dropped): the values
    and the gradient of `nn.max_pool`, ties included, computed elementwise.

    The forward pass is a reshape and a max over the two window axes. The gradient goes to the
    first maximum of each window in row-major order, as `nn.max_pool`'s (XLA's
    select_and_scatter) and PyTorch's do, but as a select over the four window positions:
    XLA's CPU gradient of a window reduction took about a third of the small_cnn train step,
    and the gradient JAX derives for the reshape and max (shared between ties: a count and a
    division) fused each backward convolution into a slow YNNPACK call (BENCHMARKS.md)."""
    return _windows(x).max(axis=(2, 4))


def _pool_fwd(x):
    y = _pool(x)
    return y, (x, y)


def _pool_bwd(residuals, g):
    x, y = residuals
    b, h, w, c = x.shape
    windows = _windows(x)
    taken = jnp.zeros(g.shape, bool)   # an earlier position of the window holds the maximum
    parts = []
    for i, j in ((0, 0), (0, 1), (1, 0)):
        hit = (windows[:, :, i, :, j] == y) & ~taken
        parts.append(jnp.where(hit, g, 0))
        taken = taken | hit
    parts.append(jnp.where(taken, 0, g))   # the last position takes what is left
    rows = [jnp.stack(parts[:2], axis=3), jnp.stack(parts[2:], axis=3)]
    dx = jnp.stack(rows, axis=2).reshape(b, h // 2 * 2, w // 2 * 2, c)
    return (jnp.pad(dx, ((0, 0), (0, h - dx.shape[1]), (0, w - dx.shape[2]), (0, 0))),)


_pool.defvjp(_pool_fwd, _pool_bwd)


class BatchNorm(nn.Module):
    """`nn.BatchNorm` over the last axis (same variables, statistics and running averages),
    normalising as one multiply-add per element: y = x * a + (bias - mean * a), with
    a = scale / sqrt(var + epsilon), the form PyTorch's CPU kernel uses.

    `nn.BatchNorm` computes (x - mean) * a + bias, and its gradient keeps x - mean, a second
    full-size copy of every map; here the gradient needs only x, which the convolution's
    gradient keeps anyway. The values agree with `nn.BatchNorm`'s to float32 rounding
    (tests/test_models.py); BENCHMARKS.md has the speed. `small_cnn` uses it; ResNet-50 keeps
    `nn.BatchNorm`, because jax2onnx 0.17.1 turns this form inside ResNet-50 into an ONNX graph
    that ONNX Runtime loads but computes wrongly (the export's parity check refuses it).

    Attributes:
      use_running_average: normalise with the running averages (evaluation) instead of the
        batch's statistics (training, which also updates the running averages).
      momentum: decay of the running averages.
      epsilon: added to the variance.
      dtype: dtype of the result (statistics and the multiply-add are float32 at least).
      axis_name: under `jax.pmap` / `shard_map`, the axis the batch statistics are averaged
        over.
    """
    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            mean, mean2 = x32.mean(axes), jnp.square(x32).mean(axes)
            if self.axis_name is not None and not self.is_initializing():
                mean, mean2 = jax.lax.pmean(jnp.stack([mean, mean2]), self.axis_name)
            var = jnp.maximum(0.0, mean2 - jnp.square(mean))
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        a = scale * jax.lax.rsqrt(var + self.epsilon)
        # As nn.BatchNorm: without a dtype, the input's promoted with the float32 parameters.
        return (x32 * a + (bias - mean * a)).astype(self.dtype or x32.dtype)


class SmallCNN(nn.Module):
    """Stages of [conv 3x3 -> BatchNorm -> ReLU -> 2x2 max-pool], then a dense layer.

    The last feature map is flattened, not averaged, so the features keep where on the face a
    pattern is: AUs are local, and their position is what tells them apart.

    Attributes:
      widths: channels of each stage; one 2x2 pool per stage.
      features: size of the dense feature layer (D).
      dropout: dropout rate on the features during training.
      dtype: computation dtype (parameters stay float32).
      bn_axis_name: under `jax.pmap`, the axis BatchNorm averages its batch statistics over.
    """
    widths: Sequence[int] = (16, 32, 64, 128)
    features: int = 256
    dropout: float = 0.0
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = x.astype(self.dtype)
        for width in self.widths:
            x = nn.Conv(width, (3, 3), use_bias=False, dtype=self.dtype)(x)
            x = BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                          axis_name=self.bn_axis_name)(x)
            x = _pool(nn.relu(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.features, dtype=self.dtype)(x))
        return nn.Dropout(self.dropout, deterministic=not train)(x)


# VGG-16 convolutional stages: (number of conv layers, channels), each closed by a 2x2 max-pool.
VGG16_STAGES = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


class VGGFace(nn.Module):
    """VGG-FACE (Parkhi et al. 2015): the VGG-16 layout, as FaceBehaviorNet uses it.

    Layer names follow the VGG-FACE release (conv1_1 ... conv5_3, fc6, fc7) so that converted
    weights can be mapped by name.

    Attributes:
      fc: width of the two fully connected layers (4096 in the paper).
      dropout: dropout after each fully connected layer (0.5 in the paper).
      dtype: computation dtype.
    """
    fc: int = 4096
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = x.astype(self.dtype)
        for stage, (layers, width) in enumerate(VGG16_STAGES, start=1):
            for layer in range(1, layers + 1):
                x = nn.relu(nn.Conv(width, (3, 3), dtype=self.dtype,
                                    name=f"conv{stage}_{layer}")(x))
            x = _pool(x)
        x = x.reshape(x.shape[0], -1)
        for name in ("fc6", "fc7"):
            x = nn.relu(nn.Dense(self.fc, dtype=self.dtype, name=name)(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return x


# ResNet-50 stages: (bottleneck blocks, width); a block's output has 4 * width channels.
RESNET50_STAGES = ((3, 64), (4, 128), (6, 256), (3, 512))
# torchvision's init (kaiming_normal_, mode="fan_out", relu), so training from scratch starts
# where a torchvision ResNet-50 would.
_kaiming = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class _Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5: the stride sits on the 3x3 conv), named as its keys."""
    width: int
    strides: int
    downsample: bool
    dtype: Any
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool):
        def conv(features, size, strides, pad, name):
            return nn.Conv(features, (size, size), strides=(strides, strides),
                           padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=_kaiming,
                           dtype=self.dtype, name=name)

        def bn(name):
            # torch momentum 0.1 weighs the new batch; flax's 0.9 weighs the running average.
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                dtype=self.dtype, axis_name=self.bn_axis_name, name=name)

        residual = x
        y = nn.relu(bn("bn1")(conv(self.width, 1, 1, 0, "conv1")(x)))
        y = nn.relu(bn("bn2")(conv(self.width, 3, self.strides, 1, "conv2")(y)))
        y = bn("bn3")(conv(4 * self.width, 1, 1, 0, "conv3")(y))
        if self.downsample:
            residual = bn("downsample_1")(
                conv(4 * self.width, 1, self.strides, 0, "downsample_0")(x))
        return nn.relu(y + residual)


class ResNet50(nn.Module):
    """torchvision's ResNet-50 (v1.5) without its fc layer: features [B, 2048].

    conv 7x7/2 -> BatchNorm -> ReLU -> max-pool 3x3/2, four stages of 3, 4, 6, 3 bottleneck
    blocks, global average pool, dropout. Paddings are torchvision's, so every feature map has
    its size (7x7 before the pool at 224 px, 4x4 at 112 px). Submodules are named after
    torchvision's state_dict (`layer1_0/bn1` for `layer1.0.bn1`); see `torchvision_key`.

    Attributes:
      dropout: dropout rate on the pooled features during training.
      dtype: computation dtype (parameters stay float32).
      bn_axis_name: under `jax.pmap`, the axis BatchNorm averages its batch statistics over.
    """
    dropout: float = 0.0
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = x.astype(self.dtype)
        x = nn.Conv(64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                    kernel_init=_kaiming, dtype=self.dtype, name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype, axis_name=self.bn_axis_name, name="bn1")(x)
        x = nn.max_pool(nn.relu(x), window_shape=(3, 3), strides=(2, 2),
                        padding=((1, 1), (1, 1)))
        for layer, (blocks, width) in enumerate(RESNET50_STAGES, start=1):
            for block in range(blocks):
                # layer1 keeps the pooled resolution; the others halve it in their first block.
                strides = 2 if layer > 1 and block == 0 else 1
                x = _Bottleneck(width, strides, downsample=block == 0, dtype=self.dtype,
                                bn_axis_name=self.bn_axis_name,
                                name=f"layer{layer}_{block}")(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dropout(self.dropout, deterministic=not train)(x)


_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var"}


def torchvision_key(flax_path: tuple[str, ...]) -> str:
    """The torchvision ResNet-50 state_dict key of a `ResNet50` variable.

    `flax_path` is relative to the module's collection (`params` or `batch_stats`), e.g.
    ("layer1_0", "bn1", "scale") -> "layer1.0.bn1.weight", ("layer1_0", "bn1", "mean") ->
    "layer1.0.bn1.running_mean", ("layer2_0", "downsample_0", "kernel") ->
    "layer2.0.downsample.0.weight". BatchNorm's `num_batches_tracked` has no flax counterpart.

    An importer must also change layouts: torch conv weights are OIHW [O, I, kh, kw], flax
    kernels HWIO [kh, kw, I, O] (`w.transpose(2, 3, 1, 0)`); BatchNorm vectors [C] are the same.
    torchvision's weights also expect ImageNet mean/std normalization, not pixels in [-1, 1].

    Raises:
      ValueError: a leaf name that ResNet50 does not have.
    """
    *modules, leaf = flax_path
    if leaf not in _TORCH_LEAF:
        raise ValueError(f"not a ResNet50 variable: {'/'.join(flax_path)}")
    # Flax names cannot hold torch's index dots: layer1_0 is layer1.0, downsample_1 downsample.1.
    modules = [re.sub(r"^(layer\d|downsample)_(\d+)$", r"\1.\2", m) for m in modules]
    return ".".join([*modules, _TORCH_LEAF[leaf]])
