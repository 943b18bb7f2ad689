"""Pretrained backbone weights in a model: `config.model.init_from` and `fbnet convert-weights`.

`init_from_problem` says, without reading weights, why an `init_from` cannot be used;
`load_init_from` reads the file (`weight_files`, converting a PyTorch state_dict on the fly by
`state_dicts`) and fits its variables to the model's backbone, resampling fc6 when the file
allows it (`resample_fc6`, see `state_dicts` on the fc6 grid); `run_command` converts a file
once and writes the result.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fbnet_jax.core.errors import UserError
from fbnet_jax.model import state_dicts, weight_files

log = logging.getLogger(__name__)

# `config.model.init_from` values that are not files: "" (the default) and "none" (said on purpose
# where a config asks for weights) start from fresh weights; REQUIRED marks a config (the paper's
# VGG-FACE on real data) that must not silently start from random weights.
FRESH = ("", "none")
REQUIRED = "required"


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
      variables: {"params", "batch_stats"} of the backbone, as
        `weight_files.load_converted` returns them.
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
    have, want = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(expected)
    if set(have) != set(want):
        missing = state_dicts.first_few("/".join(p) for p in set(want) - set(have))
        extra = state_dicts.first_few("/".join(p) for p in set(have) - set(want))
        raise UserError(f"{field} {source}: other variables than this {backbone}'s: missing "
                        f"{missing or 'none'}; extra {extra or 'none'}")
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
    nested = traverse_util.unflatten_dict(out)
    return {"params": nested.get("params", {}), "batch_stats": nested.get("batch_stats", {})}


def _fit_fc6(kernel, shape, meta, image_size: int, source: str):
    channels = state_dicts.feature_channels()
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
    backbones_with_weights = sorted({layout.backbone for layout in state_dicts.LAYOUTS.values()})
    if backbone not in backbones_with_weights:
        return (f"{path}: the {backbone} backbone has no pretrained weights to import; use "
                f"init_from with {' or '.join(backbones_with_weights)}")
    file = Path(path)
    if file.suffix not in weight_files.TORCH_SUFFIXES + weight_files.NUMPY_SUFFIXES:
        return (f"{path}: unknown weights file type {file.suffix!r}; known: "
                f"{', '.join(weight_files.TORCH_SUFFIXES + weight_files.NUMPY_SUFFIXES)}")
    if not file.is_file():
        return f"{path}: no such file"
    if not os.access(file, os.R_OK):
        return f"{path}: not readable"
    if file.suffix in weight_files.TORCH_SUFFIXES and not _has_torch():
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
    variables, meta = weight_files.load_converted(source)
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)), train=False))
    expected = {"params": shapes["params"]["backbone"],
                "batch_stats": shapes.get("batch_stats", {}).get("backbone", {})}
    fitted = fit_to_model(variables, meta, expected, backbone=backbone, image_size=image_size,
                          source=source)
    fresh = sorted(name for name in shapes["params"] if name != "backbone")
    counts = {c: len(traverse_util.flatten_dict(fitted[c])) for c in fitted}
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
      layout: a key of `state_dicts.LAYOUTS`; None detects it.
      backbone: if given, the backbone the layout must convert to (a check).
      fc6_adaptive_pool: let a VGG-FACE fc6 be used at other image sizes (see `state_dicts`'
        module docstring; torchvision_vgg16 always can).

    Returns:
      0 (the exit status).

    Raises:
      UserError: see `weight_files.read_file`, `state_dicts.convert_state_dict`; a layout of
        another backbone; a bad --out.
    """
    if layout is not None and layout not in state_dicts.LAYOUTS:
        raise UserError(f"--layout {layout!r}: unknown; known: {', '.join(state_dicts.LAYOUTS)}")
    if Path(out).suffix not in weight_files.NUMPY_SUFFIXES:
        raise UserError(f"--out {out}: must end in {' or '.join(weight_files.NUMPY_SUFFIXES)}")
    arrays, meta = weight_files.read_file(src)
    if meta is not None:
        raise UserError(f"--from {src}: already converted ({meta['layout']} for "
                        f"{meta['backbone']}); use it as --config.model.init_from={src}")
    layout = layout or state_dicts.detect_layout(arrays, src)
    spec = state_dicts.LAYOUTS[layout]
    if backbone is not None and spec.backbone != backbone:
        raise UserError(f"--from {src}: {layout} weights are for the {spec.backbone} "
                        f"backbone, not {backbone}")
    variables = state_dicts.convert_state_dict(arrays, layout, source=src)
    meta = weight_files.describe(layout, src, variables, fc6_adaptive_pool=fc6_adaptive_pool)
    try:
        path = weight_files.save_converted(variables, meta, out)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write: {e.strerror or e}") from e
    leaves = sum(len(traverse_util.flatten_dict(v)) for v in variables.values())
    dropped = sorted(k for k in state_dicts.unwrap(arrays) if state_dicts.is_dropped(spec, k))
    log.info("converted %s (%s) into %d %s variables%s; wrote %s; train with it: "
             "--config.model.backbone=%s --config.model.init_from=%s", src, layout, leaves,
             meta["backbone"], f" (dropped: {state_dicts.first_few(dropped)})" if dropped else "",
             path, meta["backbone"], path)
    return 0
