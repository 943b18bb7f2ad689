"""Pretrained backbone weights from PyTorch: conversion, converted files, `model.init_from`.

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
  to 7x7 followed by the checkpoint's fc6 (`resample_fc6`). For `torchvision_vgg16` this is
  exactly what torchvision's own `avgpool` does at any size; VGG-FACE was only ever run at 224
  px, so for it this is an approximation made only when asked for (`fc6_adaptive_pool`, the
  `--fc6_adaptive_pool` of `fbnet convert-weights`); otherwise the load names both sizes.

Converted files (`.npz` or `.safetensors`, written by `save_converted`) hold the backbone's
variables as flat keys (`params/conv1_1/kernel`, `batch_stats/bn1/mean`) and a JSON description
(`META_KEY`): backbone, layout, source, fc6 grid. Reading them needs numpy only; reading `.pth`
or `.pt` files needs torch (the `torch` extra).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbnet_jax.core.errors import UserError
from fbnet_jax.model import backbones

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt")
NUMPY_SUFFIXES = (".npz", ".safetensors")
# `config.model.init_from` values that are not files: "" (the default) and "none" (said on purpose
# where a config asks for weights) start from fresh weights; REQUIRED marks a config (the paper's
# VGG-FACE on real data) that must not silently start from random weights.
FRESH = ("", "none")
REQUIRED = "required"
META_KEY = "__fbnet_jax__"  # the npz entry / safetensors metadata key of the description
FORMAT = 1
_SHOWN = 6  # keys named in an error before "and N more"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one family of PyTorch state_dicts maps onto a backbone.

    Attributes:
      name: the layout's name (`--layout`).
      backbone: the key of `models.BACKBONES` it converts to.
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


# --- reading -------------------------------------------------------------------------------

def _as_numpy(value) -> np.ndarray:
    """A float32 numpy copy of a numpy array or a torch tensor (any float dtype, any device)."""
    if hasattr(value, "detach"):  # a torch.Tensor; bfloat16 has no numpy dtype, so go via float
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _load_torch(path: Path) -> Mapping[str, Any]:
    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise UserError(f"{path}: reading a PyTorch file needs torch: pip install "
                        f"'fbnet_jax[torch]' (or convert it where torch is installed with "
                        f"`fbnet convert-weights --from {path} --out FILE.npz`)") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except  # unpickling raises many kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: not a PyTorch state_dict that loads with weights_only=True: "
                        f"{first}") from e
    # Training scripts often save {"state_dict": ..., "epoch": ...} around the weights.
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise UserError(f"{path}: holds a {type(loaded).__name__}, not a state_dict (a mapping "
                        f"of names to tensors)")
    return loaded


def _read_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """The arrays of an .npz or .safetensors file and its fbnet description (None if absent)."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
            meta = arrays.pop(META_KEY, None)
            return arrays, None if meta is None else json.loads(str(meta))
        from safetensors import numpy as st_numpy, safe_open  # pylint: disable=g-import-not-at-top
        with safe_open(str(path), framework="np") as f:
            meta = (f.metadata() or {}).get(META_KEY)
        return st_numpy.load_file(str(path)), None if meta is None else json.loads(meta)
    except Exception as e:  # pylint: disable=broad-except  # zip, pickle, safetensors errors
        raise UserError(f"{path}: not a readable {path.suffix} file: {e}") from e


def read_file(path: str | os.PathLike) -> tuple[Mapping[str, Any], dict[str, Any] | None]:
    """Reads a weights file: (its arrays, the description of a converted file or None).

    Raises:
      UserError: a missing or unreadable file, an unknown suffix, torch missing for a torch file.
    """
    path = Path(path)
    if path.suffix not in TORCH_SUFFIXES + NUMPY_SUFFIXES:
        raise UserError(f"{path}: unknown weights file type {path.suffix!r}; known: "
                        f"{', '.join(TORCH_SUFFIXES + NUMPY_SUFFIXES)}")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix in TORCH_SUFFIXES:
        arrays, meta = _load_torch(path), None
    else:
        arrays, meta = _read_arrays(path)
    return (arrays if meta is not None else _unwrap(arrays)), meta


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state_dict without the `module.` that nn.DataParallel puts before every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def detect_layout(keys, source: str = "the state_dict") -> str:
    """The layout whose signature key is among `keys`.

    Raises:
      UserError: none matches (e.g. torchvision's vgg16_bn, which VGGFace cannot hold).
    """
    keys = set(_unwrap(dict.fromkeys(keys)))
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

def _some(items) -> str:
    items = sorted(items)
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _dropped(layout: Layout, key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in layout.dropped)


def _feature_channels() -> int:
    return backbones.VGG16_STAGES[-1][1]


def _fc6_grid(rows: int, source: str, key: str) -> int:
    """The side of the feature map fc6 reads, from its input size (C * g * g)."""
    channels = _feature_channels()
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


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _flat(tree, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


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
    state_dict = _unwrap(state_dict)
    if layout is None:
        layout = detect_layout(state_dict, source)
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    spec = LAYOUTS[layout]
    shapes, grid = _expected_variables(spec, state_dict, source)
    flat, problems, used = {}, [], set()
    for path, leaf in _flat(shapes).items():
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
    missing = {spec.torch_key(p) for p in _flat(shapes)} - set(state_dict)
    dropped = {k for k in state_dict if _dropped(spec, k)}
    unexpected = set(state_dict) - used - dropped
    if missing:
        problems.append(f"missing keys: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (not part of {layout}, which drops only "
                        f"{', '.join(spec.dropped)}): {_some(unexpected)}")
    if problems:
        guess = next((l.name for l in LAYOUTS.values() if l.signature in state_dict), layout)
        hint = f" (its keys look like {guess})" if guess != layout else ""
        raise UserError(f"{source}: not a {layout} state_dict{hint}: " + "; ".join(problems))
    if fold_normalization:
        _fold_normalization(spec, flat)
    variables = _nest(flat)
    return {"params": variables.get("params", {}), "batch_stats": variables.get("batch_stats", {})}


def describe(layout: str, source: str, variables, *, fc6_adaptive_pool: bool = False) -> dict:
    """The description a converted file carries (`META_KEY`)."""
    spec = LAYOUTS[layout]
    grid = None
    if spec.fc6:
        grid = math.isqrt(variables["params"][spec.fc6]["kernel"].shape[0] // _feature_channels())
    return {"format": FORMAT, "backbone": spec.backbone, "layout": layout,
            "source": os.path.basename(source), "input": "[-1, 1]", "fc6_grid": grid,
            "fc6_adaptive_pool": bool(spec.fc6_pools or fc6_adaptive_pool)}


# --- converted files -----------------------------------------------------------------------

def save_converted(variables, meta: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Writes converted variables (and their description) to an .npz or .safetensors file.

    The file appears whole or not at all (written beside it, then renamed).
    """
    path = Path(path)
    if path.suffix not in NUMPY_SUFFIXES:
        raise UserError(f"--out {path}: must end in {' or '.join(NUMPY_SUFFIXES)}")
    arrays = {"/".join(p): np.ascontiguousarray(v) for p, v in _flat(variables).items()}
    text = json.dumps(dict(meta), sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.suffix == ".npz":
                np.savez(f, **arrays, **{META_KEY: np.array(text)})
            else:
                from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
                f.write(st_numpy.save(arrays, metadata={META_KEY: text}))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_converted(path: str | os.PathLike, *, fc6_adaptive_pool: bool = False):
    """Backbone variables and their description from any weights file (converting if needed).

    A file written by `save_converted` is read as it is; a torch file, or an .npz/.safetensors
    holding a raw state_dict, is converted (layout detected, normalization folded).

    Returns:
      (variables {"params", "batch_stats"}, description dict as `describe` makes it).
    """
    arrays, meta = read_file(path)
    if meta is None:
        layout = detect_layout(arrays, str(path))
        variables = convert_state_dict(arrays, layout, source=str(path))
        return variables, describe(layout, str(path), variables,
                                   fc6_adaptive_pool=fc6_adaptive_pool)
    if meta.get("format") != FORMAT or meta.get("backbone") not in ("vgg_face", "resnet50"):
        raise UserError(f"{path}: a converted weights file of an unknown format ({meta})")
    flat = {tuple(key.split("/")): value.astype(np.float32) for key, value in arrays.items()}
    variables = _nest(flat)
    return ({"params": variables.get("params", {}),
             "batch_stats": variables.get("batch_stats", {})}, meta)


# --- into a model --------------------------------------------------------------------------

def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in]: torch's AdaptiveAvgPool1d as a matrix (bins floor..ceil)."""
    matrix = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def resample_fc6(kernel: np.ndarray, grid_from: int, grid_to: int) -> np.ndarray:
    """fc6 for a grid_to x grid_to map: an adaptive average pool to grid_from, then fc6."""
    pool = adaptive_pool_matrix(grid_to, grid_from)  # [grid_from, grid_to]
    k = kernel.reshape(grid_from, grid_from, -1, kernel.shape[-1])
    return np.einsum("ia,jb,ijcf->abcf", pool, pool, k).reshape(-1, kernel.shape[-1])


def fit_to_model(variables, meta: Mapping[str, Any], expected, *, backbone: str,
                 image_size: int, source: str):
    """Checks converted variables against the model's backbone; resamples fc6 if allowed.

    Args:
      variables: {"params", "batch_stats"} of the backbone, as `load_converted` returns them.
      meta: their description.
      expected: the model's backbone variables (shapes), {"params", "batch_stats"}.
      backbone: config.model.backbone; image_size: config.data.image_size (for messages).
      source: names the file in errors.

    Raises:
      UserError: another backbone, other leaves, or shapes that differ (naming both).
    """
    field = "model.init_from"
    if meta["backbone"] != backbone:
        raise UserError(f"{field} {source}: holds {meta['backbone']} weights ({meta['layout']}), "
                        f"but model.backbone is {backbone}")
    have, want = _flat(variables), _flat(expected)
    if set(have) != set(want):
        raise UserError(f"{field} {source}: other variables than this {backbone}'s: missing "
                        f"{_some('/'.join(p) for p in set(want) - set(have)) or 'none'}; extra "
                        f"{_some('/'.join(p) for p in set(have) - set(want)) or 'none'}")
    out = {}
    for path, leaf in want.items():
        value = have[path]
        if path == ("params", "fc6", "kernel") and value.shape != leaf.shape \
                and value.shape[1:] == leaf.shape[1:]:
            value = _fit_fc6(value, leaf.shape, meta, image_size, source)
        if value.shape != tuple(leaf.shape):
            raise UserError(f"{field} {source}: {'/'.join(path)} has shape {list(value.shape)}, "
                            f"but this model's needs {list(leaf.shape)} (see "
                            f"model.backbones.{backbone})")
        out[path] = value
    nested = _nest(out)
    return {"params": nested.get("params", {}), "batch_stats": nested.get("batch_stats", {})}


def _fit_fc6(kernel, shape, meta, image_size: int, source: str):
    channels = _feature_channels()
    grid_from = meta["fc6_grid"]
    grid_to = math.isqrt(shape[0] // channels)
    if not meta.get("fc6_adaptive_pool"):
        raise UserError(
            f"model.init_from {source}: its fc6 reads a {grid_from}x{grid_from}x{channels} feature "
            f"map ({32 * grid_from} px images), but data.image_size={image_size} gives "
            f"{grid_to}x{grid_to}x{channels}; set data.image_size to {32 * grid_from}, or convert "
            f"with `fbnet convert-weights --fc6_adaptive_pool` to average-pool the "
            f"{grid_to}x{grid_to} map to {grid_from}x{grid_from} inside fc6 (an approximation "
            f"for {meta['layout']})")
    log.info("init_from: fc6 resampled from a %dx%d to a %dx%d feature map (adaptive average "
             "pool folded in)", grid_from, grid_from, grid_to, grid_to)
    return resample_fc6(kernel, grid_from, grid_to)


def _has_torch() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # ValueError: a torch module without a spec
        return False


def init_from_problem(path: str, backbone: str) -> str | None:
    """Why `config.model.init_from` cannot be used with `backbone`, or None (reads no weights).

    Checks what can be known without reading the file: the backbone has importable weights,
    the file type is known, the file exists and is readable, torch is there for a torch file.
    """
    if not isinstance(path, str):
        return f"must be a file path (a string), got {path!r}"
    if path in FRESH:
        return None
    if path == REQUIRED:
        return ("this config starts the backbone from pretrained weights: convert the VGG-Face "
                "release (vgg_face_dag.pth) once with `fbnet convert-weights --from "
                "vgg_face_dag.pth --out vggface.npz` and pass --config.model.init_from=vggface.npz"
                " (or --config.model.init_from=none to train from random weights on purpose)")
    backbones_with_weights = sorted({layout.backbone for layout in LAYOUTS.values()})
    if backbone not in backbones_with_weights:
        return (f"{path}: the {backbone} backbone has no pretrained weights to import; use "
                f"init_from with {' or '.join(backbones_with_weights)}")
    file = Path(path)
    if file.suffix not in TORCH_SUFFIXES + NUMPY_SUFFIXES:
        return (f"{path}: unknown weights file type {file.suffix!r}; known: "
                f"{', '.join(TORCH_SUFFIXES + NUMPY_SUFFIXES)}")
    if not file.is_file():
        return f"{path}: no such file"
    if not os.access(file, os.R_OK):
        return f"{path}: not readable"
    if file.suffix in TORCH_SUFFIXES and not _has_torch():
        return (f"{path}: reading a PyTorch file needs torch: pip install 'fbnet_jax[torch]' "
                f"(or convert it where torch is installed: fbnet convert-weights --from {path} "
                f"--out FILE.npz)")
    return None


def load_init_from(path: str | os.PathLike, model, image_size: int, backbone: str):
    """The backbone variables `config.model.init_from` names, fitted to `model`.

    Returns:
      {"params": ..., "batch_stats": ...} of numpy arrays for the model's "backbone" subtrees.
    """
    source = os.fspath(path)
    variables, meta = load_converted(source)
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)), train=False))
    expected = {"params": shapes["params"]["backbone"],
                "batch_stats": shapes.get("batch_stats", {}).get("backbone", {})}
    fitted = fit_to_model(variables, meta, expected, backbone=backbone, image_size=image_size,
                          source=source)
    fresh = sorted(name for name in shapes["params"] if name != "backbone")
    counts = {c: len(_flat(fitted[c])) for c in fitted}
    log.info("init_from %s (%s, converted from %s): loaded all %d params and %d batch_stats "
             "leaves of the backbone (%s); heads fresh: %s", source, meta["layout"],
             meta["source"], counts["params"], counts["batch_stats"],
             ", ".join(sorted(fitted["params"])), ", ".join(fresh))
    return fitted


# --- fbnet convert-weights -----------------------------------------------------------------

def run_command(src: str, out: str, layout: str | None = None, backbone: str | None = None, *,
                fc6_adaptive_pool: bool = False) -> int:
    """`fbnet convert-weights --from SRC --out OUT [--layout L]`: writes converted weights.

    Args:
      src: a .pth/.pt state_dict (needs torch) or an .npz/.safetensors state_dict.
      out: the .npz or .safetensors file to write (`--config.model.init_from=OUT` uses it).
      layout: a key of LAYOUTS; None detects it.
      backbone: if given, the backbone the layout must convert to (a check).
      fc6_adaptive_pool: let a VGG-FACE fc6 be used at other image sizes (see the module
        docstring; torchvision_vgg16 always can).

    Returns:
      0 (the exit status).

    Raises:
      UserError: see `read_file`, `convert_state_dict`; a layout of another backbone; a bad --out.
    """
    if layout is not None and layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r}: unknown; known: {', '.join(LAYOUTS)}")
    if Path(out).suffix not in NUMPY_SUFFIXES:
        raise UserError(f"--out {out}: must end in {' or '.join(NUMPY_SUFFIXES)}")
    arrays, meta = read_file(src)
    if meta is not None:
        raise UserError(f"--from {src}: already converted ({meta['layout']} for "
                        f"{meta['backbone']}); use it as --config.model.init_from={src}")
    layout = layout or detect_layout(arrays, src)
    if backbone is not None and LAYOUTS[layout].backbone != backbone:
        raise UserError(f"--from {src}: {layout} weights are for the {LAYOUTS[layout].backbone} "
                        f"backbone, not {backbone}")
    variables = convert_state_dict(arrays, layout, source=src)
    meta = describe(layout, src, variables, fc6_adaptive_pool=fc6_adaptive_pool)
    try:
        path = save_converted(variables, meta, out)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write: {e.strerror or e}") from e
    leaves = sum(len(_flat(v)) for v in variables.values())
    dropped = sorted(k for k in _unwrap(arrays) if _dropped(LAYOUTS[layout], k))
    log.info("converted %s (%s) into %d %s variables%s; wrote %s; train with it: "
             "--config.model.backbone=%s --config.model.init_from=%s", src, layout, leaves,
             meta["backbone"], f" (dropped: {_some(dropped)})" if dropped else "", path,
             meta["backbone"], path)
    return 0
