"""Weights files: reading .pth/.pt, .npz and .safetensors files; writing and reading converted ones.

Converted files (`.npz` or `.safetensors`, written by `save_converted`) hold the backbone's
variables as flat keys (`params/conv1_1/kernel`, `batch_stats/bn1/mean`) and a JSON description
(`META_KEY`): backbone, layout, source, fc6 grid. Reading them needs numpy only; reading `.pth`
or `.pt` files needs torch (the `torch` extra).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from fbnet_jax.core.errors import UserError
from fbnet_jax.model import state_dicts

TORCH_SUFFIXES = (".pth", ".pt")
NUMPY_SUFFIXES = (".npz", ".safetensors")
META_KEY = "__fbnet_jax__"  # the npz entry / safetensors metadata key of the description
FORMAT = 1


# --- reading -------------------------------------------------------------------------------

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
    return (arrays if meta is not None else state_dicts.unwrap(arrays)), meta


# --- converted files -----------------------------------------------------------------------

def describe(layout: str, source: str, variables, *, fc6_adaptive_pool: bool = False) -> dict:
    """The description a converted file carries (`META_KEY`)."""
    spec = state_dicts.LAYOUTS[layout]
    grid = None
    if spec.fc6:
        rows = variables["params"][spec.fc6]["kernel"].shape[0]
        grid = math.isqrt(rows // state_dicts.feature_channels())
    return {"format": FORMAT, "backbone": spec.backbone, "layout": layout,
            "source": os.path.basename(source), "input": "[-1, 1]", "fc6_grid": grid,
            "fc6_adaptive_pool": bool(spec.fc6_pools or fc6_adaptive_pool)}


def save_converted(variables, meta: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Writes converted variables (and their description) to an .npz or .safetensors file.

    The file appears whole or not at all (written beside it, then renamed).
    """
    path = Path(path)
    if path.suffix not in NUMPY_SUFFIXES:
        raise UserError(f"--out {path}: must end in {' or '.join(NUMPY_SUFFIXES)}")
    arrays = {"/".join(p): np.ascontiguousarray(v)
              for p, v in traverse_util.flatten_dict(variables).items()}
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
        layout = state_dicts.detect_layout(arrays, str(path))
        variables = state_dicts.convert_state_dict(arrays, layout, source=str(path))
        return variables, describe(layout, str(path), variables,
                                   fc6_adaptive_pool=fc6_adaptive_pool)
    if meta.get("format") != FORMAT or meta.get("backbone") not in ("vgg_face", "resnet50"):
        raise UserError(f"{path}: a converted weights file of an unknown format ({meta})")
    flat = {tuple(key.split("/")): value.astype(np.float32) for key, value in arrays.items()}
    variables = traverse_util.unflatten_dict(flat)
    return ({"params": variables.get("params", {}),
             "batch_stats": variables.get("batch_stats", {})}, meta)

