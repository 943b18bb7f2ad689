"""Convolutional backbones: image [B, H, W, 3] in [-1, 1] -> features [B, D].

`vgg_face` is the paper's network (13 conv 3x3 + 5 max-pool, fc 4096, fc 4096, dropout 0.5).
`small_cnn` is a fast BatchNorm CNN for CPU demos and tests. Pools are written with keyword
arguments because jax2onnx patches `nn.max_pool` with a keyword-only `window_shape`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def _pool(x):
    return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))


class SmallCNN(nn.Module):
    """Stages of [conv 3x3 -> BatchNorm -> ReLU] each followed by a 2x2 max-pool, then a dense layer.

    The last feature map is flattened, not averaged, so the features keep where on the face a
    pattern is: AUs are local, and their position is what tells them apart.

    Attributes:
      widths: channels of each stage; one 2x2 pool per stage.
      features: size of the dense feature layer (D).
      dropout: dropout rate on the features during training.
      dtype: computation dtype (parameters stay float32).
    """
    widths: Sequence[int] = (16, 32, 64, 128)
    features: int = 256
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = x.astype(self.dtype)
        for width in self.widths:
            x = nn.Conv(width, (3, 3), use_bias=False, dtype=self.dtype)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
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
