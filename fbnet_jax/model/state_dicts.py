"""PyTorch state_dicts -> backbone variables: the layouts, their detection, the conversion.

Three state_dict layouts convert (the heads are never imported: they start fresh):

- `vgg_face_torch` -> `vgg_face`: the PyTorch port of the Oxford VGG-FACE weights whose module
  names are the release's layer names (`vgg_face_dag`): `conv{1..5}_{1..3}.weight` [O, I, 3, 3]
  and `.bias` [O] for the 13 convolutions (conv1_1, conv1_2, conv2_1, conv2_2, conv3_1..3,
  conv4_1..3, conv5_1..3), `fc6.weight` [4096, 512*7*7], `fc6.bias`, `fc7.weight` [4096, 4096],
  `fc7.bias`; dropped: `fc8.weight`, `fc8.bias` (the 2622 identities). Input: RGB pixels in
  [0, 255] minus the mean (129.186, 104.762, 93.594).
- `torchvision_vgg16` -> `vgg_face`: torchvision's `vgg16` (no BatchNorm): `features.N.weight`
  and `.bias` for N = 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28 (conv1_1 ... conv5_3),
  `classifier.0.*` (fc6, [4096, 25088]), `classifier.3.*` (fc7); dropped: `classifier.6.*` (the
  1000 ImageNet classes). Input: RGB in [0, 1], ImageNet mean/std.
- `torchvision_resnet50` -> `resnet50`: torchvision's `resnet50` keys, one per variable of
  `backbones.ResNet50` (`backbones.torchvision_key`): conv `weight`, BatchNorm `weight`/`bias` ->
  params `scale`/`bias`, `running_mean`/`running_var` -> batch_stats `mean`/`var`; dropped:
  `*.num_batches_tracked`, `fc.weight`, `fc.bias`. Input: as torchvision_vgg16.

A state_dict whose keys all start with `module.` (saved from `nn.DataParallel`) is read without
that prefix. Conv kernels go OIHW -> HWIO, dense kernels [out, in] -> [in, out]. fc6 also
changes its row order: torch flattens the last feature map as (C, H, W), flax as (H, W, C).

Two changes make the converted backbone a drop-in for fbnet's input (pixels in [-1, 1]):
- the layout's input normalization is folded into the first convolution (its kernel is scaled
  per input channel and the mean's offset goes into its bias, or for ResNet-50, which has no conv
  bias, into bn1's running mean). This is exact except on the border pixels that the first conv
  reads from its zero padding (zero means "the mean colour" in torch, mid-grey here);
- fc6 takes the last feature map of the checkpoint's training size (7x7 at 224 px). At another
  `data.image_size` (3x3 at the paper's 112 px) fc6 gets the weights of an adaptive average pool
  to 7x7 followed by the checkpoint's fc6 (`weights.resample_fc6`). For `torchvision_vgg16` this is
  exactly what torchvision's own `avgpool` does at any size; VGG-FACE was only ever run at 224
  px, so for it this is an approximation made only when asked for (`fc6_adaptive_pool`, the
  `--fc6_adaptive_pool` of `fbnet convert-weights`); otherwise the load names both sizes.

Reading and writing weights files is `weight_files`; using them (`model.init_from`, `fbnet
convert-weights`) is `weights`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fbnet_jax.core.errors import UserError
from fbnet_jax.model import backbones

_SHOWN = 6  # keys named in an error before "and N more"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one family of PyTorch state_dicts maps onto a backbone.

    Attributes:
      name: the layout's name (`--layout`).
      backbone: the key of `facebehaviornet.BACKBONES` it converts to.
      torch_key: flax path (relative to the backbone, collection first) -> state_dict key.
      dropped: the keys that are deliberately not imported (fnmatch patterns).
      signature: a key only this layout has (auto-detection).
      mean, std, pixel_max: the input normalization the weights were trained with:
        (pixel / 255 * pixel_max - mean) / std per RGB channel.
      first_conv: the conv that reads the image; first_bn: its BatchNorm, if it has no bias.
      fc6: the dense layer that reads the flattened feature map (None: a pooled backbone).
      fc6_pools: the source network pools adaptively to its fc6 grid (torchvision's VGG).
    """
    name: str
    backbone: str
    torch_key: Callable[[tuple[str, ...]], str]
    dropped: tuple[str, ...]
    signature: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pixel_max: float
    first_conv: str
    first_bn: str | None = None
    fc6: str | None = None
    fc6_pools: bool = False


_TORCH_LEAF = {"kernel": "weight", "bias": "bias"}


def _vgg_face_key(path: tuple[str, ...]) -> str:
    _, module, leaf = path
    return f"{module}.{_TORCH_LEAF[leaf]}"


def _torchvision_vgg_modules() -> dict[str, str]:
    """VGGFace module name -> torchvision vgg16 module (`features.N`, `classifier.N`)."""
    names, index = {}, 0
    for stage, (layers, _) in enumerate(backbones.VGG16_STAGES, start=1):
        for layer in range(1, layers + 1):
            names[f"conv{stage}_{layer}"] = f"features.{index}"
            index += 2  # the conv and its ReLU
        index += 1  # the stage's max-pool
    # classifier: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear (the 1000 classes).
    names.update(fc6="classifier.0", fc7="classifier.3")
    return names


_TORCHVISION_VGG = _torchvision_vgg_modules()


def _torchvision_vgg_key(path: tuple[str, ...]) -> str:
    _, module, leaf = path
    return f"{_TORCHVISION_VGG[module]}.{_TORCH_LEAF[leaf]}"


_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), pixel_max=1.0)

LAYOUTS = {layout.name: layout for layout in (
    Layout("vgg_face_torch", "vgg_face", _vgg_face_key, ("fc8.weight", "fc8.bias"),
           signature="conv1_1.weight", mean=(129.186279296875, 104.76238250732422,
                                             93.59396362304688),
           std=(1.0, 1.0, 1.0), pixel_max=255.0, first_conv="conv1_1", fc6="fc6"),
    Layout("torchvision_vgg16", "vgg_face", _torchvision_vgg_key,
           ("classifier.6.weight", "classifier.6.bias"),
           signature="features.0.weight", first_conv="conv1_1", fc6="fc6", fc6_pools=True,
           **_IMAGENET),
    Layout("torchvision_resnet50", "resnet50", lambda path: backbones.torchvision_key(path[1:]),
           ("fc.weight", "fc.bias", "*.num_batches_tracked"),
           signature="layer1.0.conv1.weight", first_conv="conv1", first_bn="bn1", **_IMAGENET),
)}


def unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state_dict without the `module.` that nn.DataParallel puts before every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def detect_layout(keys, source: str = "the state_dict") -> str:
    """The layout whose signature key is among `keys`.

    Raises:
      UserError: none matches (e.g. torchvision's vgg16_bn, which VGGFace cannot hold).
    """
    keys = set(unwrap(dict.fromkeys(keys)))
    if "features.1.running_mean" in keys:
        raise UserError(f"{source}: a VGG with BatchNorm (torchvision vgg16_bn); the vgg_face "
                        f"backbone has no BatchNorm, so only plain vgg16 weights import")
    for layout in LAYOUTS.values():
        if layout.signature in keys:
            return layout.name
    shown = ", ".join(sorted(keys)[:_SHOWN]) or "no keys"
    raise UserError(f"{source}: cannot tell its layout from its keys ({shown}, ...); known "
                    f"layouts (and a key each has): " + ", ".join(
                        f"{l.name} ({l.signature})" for l in LAYOUTS.values()))


# --- conversion ----------------------------------------------------------------------------

def _as_numpy(value) -> np.ndarray:
    """A float32 numpy copy of a numpy array or a torch tensor (any float dtype, any device)."""
    if hasattr(value, "detach"):  # a torch.Tensor; bfloat16 has no numpy dtype, so go via float
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def first_few(items) -> str:
    """Sorted `items` as "a, b, c", the first few only (then "and N more"): for messages."""
    items = sorted(items)
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def is_dropped(layout: Layout, key: str) -> bool:
    """`key` is one the layout deliberately does not import (the classifier, counters)."""
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in layout.dropped)


def feature_channels() -> int:
    """The channels of a VGG-16's last feature map, the one fc6 reads flattened."""
    return backbones.VGG16_STAGES[-1][1]


def _fc6_grid(rows: int, source: str, key: str) -> int:
    """The side of the feature map fc6 reads, from its input size (C * g * g)."""
    channels = feature_channels()
    grid = math.isqrt(rows // channels)
    if grid < 1 or grid * grid * channels != rows:
        raise UserError(f"{source}: {key} takes {rows} inputs, not {channels} x g x g (the "
                        f"flattened {channels}-channel feature map of a VGG-16)")
    return grid


def _expected_variables(layout: Layout, state_dict: Mapping[str, Any], source: str):
    """The backbone's variables (shapes) for the checkpoint's own sizes, and the fc6 grid."""
    kwargs, size, grid = {}, 32, None
    if layout.fc6:
        key = layout.torch_key(("params", layout.fc6, "kernel"))
        if key in state_dict and len(state_dict[key].shape) == 2:
            out_features, rows = state_dict[key].shape
            grid = _fc6_grid(rows, source, key)
            kwargs, size = dict(fc=int(out_features)), 32 * grid  # VGG-16 pools 5 times
    module = backbones.VGGFace(**kwargs) if layout.backbone == "vgg_face" else backbones.ResNet50()
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, size, size, 3)), train=False))
    return shapes, grid


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:  # HWIO -> OIHW
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    return tuple(reversed(flax_shape))  # dense [in, out] -> [out, in]; vectors unchanged


def _to_flax(value: np.ndarray, grid: int | None) -> np.ndarray:
    """A torch-layout array in flax layout (`grid`: fc6's, whose rows are reordered)."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2 and grid is not None:
        out = value.shape[0]
        # torch's row index is c*g*g + h*g + w, flax's h*g*C + w*C + c.
        return value.reshape(out, -1, grid, grid).transpose(2, 3, 1, 0).reshape(-1, out)
    return value.T if value.ndim == 2 else value


def _fold_normalization(layout: Layout, flat: dict[tuple[str, ...], np.ndarray]) -> None:
    """Makes the first conv take pixels x in [-1, 1] instead of the layout's normalized input.

    The layout's input is (p - mean) / std with p = (x + 1) * a, a = pixel_max / 2, i.e.
    (a / std) * x + (a - mean) / std: the kernel scales by a / std per input channel and the
    constant term, convolved, is a per-output-channel offset (exact away from the padding).
    """
    a = layout.pixel_max / 2
    mean, std = np.asarray(layout.mean, np.float32), np.asarray(layout.std, np.float32)
    kernel_path = ("params", layout.first_conv, "kernel")
    kernel = flat[kernel_path]
    offset = np.einsum("hwio,i->o", kernel, (a - mean) / std)
    flat[kernel_path] = kernel * (a / std)[:, None]
    if layout.first_bn is None:
        bias_path = ("params", layout.first_conv, "bias")
        flat[bias_path] = flat[bias_path] + offset
    else:  # no conv bias: BatchNorm subtracts its mean right after, so shift the mean instead
        mean_path = ("batch_stats", layout.first_bn, "mean")
        flat[mean_path] = flat[mean_path] - offset


def convert_state_dict(state_dict: Mapping[str, Any], layout: str | None = None, *,
                       fold_normalization: bool = True,
                       source: str = "the state_dict") -> dict[str, dict[str, Any]]:
    """Converts a PyTorch state_dict into the variables of the backbone it belongs to.

    Args:
      state_dict: key -> numpy array or torch tensor, in one of `LAYOUTS`.
      layout: a key of LAYOUTS; None detects it from the keys.
      fold_normalization: fold the layout's input normalization into the first conv so the
        backbone takes pixels in [-1, 1] (see the module docstring); False keeps the torch
        network's function exactly (same input as torch).
      source: names the state_dict in errors (a file name).

    Returns:
      {"params": ..., "batch_stats": ...}: nested dicts of float32 numpy arrays, the subtrees
      `FaceBehaviorNet` keeps under "backbone" (batch_stats empty for vgg_face). fc6 keeps the
      checkpoint's grid (7x7 for 224 px training).

    Raises:
      UserError: an unknown layout, missing or unexpected keys, or a key whose shape is not the
        backbone's (naming the key, both shapes and the flax variable).
    """
    state_dict = unwrap(state_dict)
    if layout is None:
        layout = detect_layout(state_dict, source)
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    spec = LAYOUTS[layout]
    shapes, grid = _expected_variables(spec, state_dict, source)
    flat, problems, used = {}, [], set()
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        key = spec.torch_key(path)
        if key not in state_dict:
            continue
        used.add(key)
        have, want = tuple(state_dict[key].shape), _torch_shape(leaf.shape)
        if have != want:
            problems.append(f"{key} has shape {list(have)}, but {'/'.join(path)} of the "
                            f"{spec.backbone} backbone needs {list(want)} (as torch stores it)")
            continue
        flat[path] = _to_flax(_as_numpy(state_dict[key]),
                              grid if path[1:] == (spec.fc6, "kernel") else None)
    missing = {spec.torch_key(p) for p in traverse_util.flatten_dict(shapes)} - set(state_dict)
    dropped = {k for k in state_dict if is_dropped(spec, k)}
    unexpected = set(state_dict) - used - dropped
    if missing:
        problems.append(f"missing keys: {first_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (not part of {layout}, which drops only "
                        f"{', '.join(spec.dropped)}): {first_few(unexpected)}")
    if problems:
        guess = next((l.name for l in LAYOUTS.values() if l.signature in state_dict), layout)
        hint = f" (its keys look like {guess})" if guess != layout else ""
        raise UserError(f"{source}: not a {layout} state_dict{hint}: " + "; ".join(problems))
    if fold_normalization:
        _fold_normalization(spec, flat)
    variables = traverse_util.unflatten_dict(flat)
    return {"params": variables.get("params", {}), "batch_stats": variables.get("batch_stats", {})}

