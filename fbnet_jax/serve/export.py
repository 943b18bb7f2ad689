"""Export a trained network to ONNX, StableHLO, a TensorFlow SavedModel or safetensors.

  fbnet export --workdir DIR [--step N] | --checkpoint PATH --format F --out PATH

Every graph format holds the inference graph of `InferenceModel.apply` (BatchNorm with its
running statistics, no dropout) with the weights inside it. Its one input, `image`, is the float32
model input NHWC [B, S, S, 3], B any batch size, S = `fbnet.preprocessing.image_size`:

  image = uint8 RGB pixel · SCALE + OFFSET        (SCALE = 1/128, OFFSET = -1)

and it returns the three outputs of `inference.OUTPUTS`, named and in that order. What a consumer
needs besides the graph (the preprocessing, the AU list, the expression classes, the config and
the step) is `InferenceModel.metadata()`: the ONNX file's `metadata_props`; for the other formats
the `metadata` object of `<out>.json`, written beside the artefact with the calling convention.

This module runs an export: the request checked before any work, the artefact written under a
temporary name beside `out` (by its format, `export_formats`, which describes the four), the
parity check (`parity`: loaded back from disk and run on synthetic faces, the artefact must
reproduce the JAX model; it says why the tolerance is what it is), the sidecar `<out>.json`, and
only then the move to `out`: an artefact that fails the check is not left there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import jax

from fbnet_jax.core.errors import UserError
from fbnet_jax.core.images import OFFSET, SCALE
from fbnet_jax.runtime import state as state_lib
from fbnet_jax.serve.export_formats import (FORMAT_SPECS, FORMATS, INPUT_NAME, STABLEHLO_BATCH_DIM,
                                            STABLEHLO_PLATFORMS, load_safetensors, require)
from fbnet_jax.serve.inference import OUTPUTS, InferenceModel
from fbnet_jax.serve.parity import (PARITY_BATCH_SIZES, TOLERANCE, ParityError, check_parity,
                                    parity_faces)

# The API of exporting, wherever each part is defined (the sidecar of a safetensors export tells
# its consumer to call `fbnet_jax.serve.export.load_safetensors`).
__all__ = ["FORMATS", "INPUT_NAME", "ExportReport", "ParityError", "export", "load_safetensors",
           "parity_faces", "run_command", "sidecar_path"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What `export` wrote and how well it agrees with the JAX model.

    Attributes:
      fmt: the format.
      path: the artefact (a file; a directory for savedmodel).
      files: every file or directory written (the artefact, and `<out>.json` but for onnx).
      graph_dtype: the computation dtype of the exported graph.
      export_seconds: time to build and write the artefact.
      check_seconds: time of the parity check (loading the artefact back and running it).
      max_abs_diff: per output, the largest |artefact - JAX| over the parity batches.
      tolerance: tol of the check (`parity.TOLERANCE`).
    """
    fmt: str
    path: Path
    files: tuple[Path, ...]
    graph_dtype: str
    export_seconds: float
    check_seconds: float
    max_abs_diff: Mapping[str, float]
    tolerance: float

    @property
    def size_bytes(self) -> int:
        """Bytes written, sidecar JSON included."""
        return sum(_size(path) for path in self.files)

    def lines(self) -> list[str]:
        """The console lines: what was written, then the parity check's result."""
        diffs = ", ".join(f"{name} {value:.1e}" for name, value in self.max_abs_diff.items())
        return [
            f"exported {self.fmt} ({self.graph_dtype}) in {self.export_seconds:.1f} s: "
            f"{', '.join(map(str, self.files))} ({self.size_bytes / 1e6:.2f} MB)",
            f"parity with the JAX model on synthetic faces (batches of "
            f"{' and '.join(map(str, PARITY_BATCH_SIZES))}, {self.check_seconds:.1f} s): max abs "
            f"difference {diffs} (tolerance {self.tolerance:g}·(1 + |value|))",
        ]


def sidecar_path(out: str | Path) -> Path:
    """`<out>.json`: the metadata and calling convention written beside an artefact."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def run_command(workdir: str | None, checkpoint: str | None, step: int | None,
                fmt: str | None, out: str | None) -> int:
    """`fbnet export`: the checkpoint of a run (or a checkpoint directory) to `out` as `fmt`.

    Returns:
      0 (the exit status) once the artefact is written and has passed the parity check.

    Raises:
      UserError: a missing or contradictory flag, an unknown format, an --out that cannot be
        written, a missing optional package, or a checkpoint that cannot be read.
    """
    if bool(workdir) == bool(checkpoint):
        raise UserError("fbnet export needs --workdir DIR (of a training run, with --step N "
                        "to pick a checkpoint) or --checkpoint PATH, one of the two")
    if checkpoint and step is not None:
        raise UserError("--step goes with --workdir; a --checkpoint directory is one step "
                        "already")
    if not fmt:
        raise UserError(f"fbnet export needs --format, one of {', '.join(FORMATS)}")
    if not out:
        raise UserError("fbnet export needs --out PATH (where the exported model is written)")
    _check_request(fmt, Path(out).expanduser())  # before the (slow) restore
    model = (InferenceModel.from_workdir(workdir, step) if workdir
             else InferenceModel.from_checkpoint(checkpoint))
    export(model, fmt, out)
    return 0


def export(model: InferenceModel, fmt: str, out: str | Path) -> ExportReport:
    """Writes `model` to `out` as `fmt` and checks that the artefact reproduces it.

    The artefact is written under a temporary name beside `out`, loaded back, run on synthetic
    faces and compared with `model.apply`; only then is it moved to `out` (replacing a file, or
    for savedmodel a SavedModel directory, that was there).

    Raises:
      UserError: an unknown format, an `out` that cannot be written, a missing optional package.
      ParityError: the artefact does not reproduce the JAX model (nothing is left at `out`).
    """
    out = Path(out).expanduser()
    _check_request(fmt, out)
    writer = FORMAT_SPECS[fmt]
    graph_model = _float32(model) if fmt == "onnx" else model
    graph_dtype = str(graph_model.config.model.dtype)
    tolerance = 0.0 if fmt == "safetensors" else TOLERANCE[graph_dtype]
    staged = out.with_name(f".{out.name}.partial-{os.getpid()}")
    written = [staged] if fmt == "onnx" else [staged, sidecar_path(staged)]
    try:
        _remove(*written)
        start = time.perf_counter()
        writer.write(graph_model, staged, model.metadata())
        export_seconds = time.perf_counter() - start
        start = time.perf_counter()
        diffs = check_parity(graph_model, writer.load(staged, graph_model), tolerance,
                             f"{fmt} export")
        check_seconds = time.perf_counter() - start
        if fmt != "onnx":
            _write_sidecar(sidecar_path(staged), fmt, out, graph_model, model.metadata(), diffs,
                           tolerance)
        _move(staged, out)
        if fmt != "onnx":
            os.replace(sidecar_path(staged), sidecar_path(out))
    finally:
        _remove(*written)
    files = (out,) if fmt == "onnx" else (out, sidecar_path(out))
    report = ExportReport(fmt=fmt, path=out, files=files, graph_dtype=graph_dtype,
                          export_seconds=export_seconds, check_seconds=check_seconds,
                          max_abs_diff=diffs, tolerance=tolerance)
    for line in report.lines():
        log.info("%s", line)
    return report


# --------------------------------------------------------------------------------------------
# Checks before any work.

def _check_request(fmt: str, out: Path) -> None:
    """Refuses an unknown format, an `out` of the wrong kind, and a missing package."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: unknown; one of {', '.join(FORMATS)}")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: {out.parent} is not a directory")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {out.parent} is not writable")
    if fmt == "savedmodel":
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out}: is a file; a SavedModel is a directory")
        if out.is_dir() and any(out.iterdir()) and not (out / "saved_model.pb").is_file():
            raise UserError(f"--out {out}: a directory that is not empty and holds no SavedModel "
                            f"(saved_model.pb); give a new directory")
    elif out.is_dir():
        raise UserError(f"--out {out}: is a directory; --format {fmt} writes a file "
                        f"(e.g. {out / ('model.' + fmt)})")
    if fmt != "onnx" and sidecar_path(out).is_dir():
        raise UserError(f"--out {out}: {sidecar_path(out)} (the metadata written beside it) is "
                        f"a directory")
    require(fmt)


# --------------------------------------------------------------------------------------------
# Helpers.

def _float32(model: InferenceModel) -> InferenceModel:
    """`model` computing in float32 (its parameters are float32 whatever `model.dtype`)."""
    if model.config.model.dtype == "float32":
        return model
    config = model.config.copy_and_resolve_references()
    config.model.dtype = "float32"
    log.info("the graph computes in float32 (the checkpoint's model.dtype is %s)",
             model.config.model.dtype)
    return dataclasses.replace(model, config=config, model=state_lib.model_for(config))


def _write_sidecar(path: Path, fmt: str, out: Path, model: InferenceModel,
                   metadata: Mapping[str, str], diffs: Mapping[str, float],
                   tolerance: float) -> None:
    """`<out>.json`: the metadata (the ONNX metadata_props' keys and values) and how to call."""
    size, batch = model.image_size, (STABLEHLO_BATCH_DIM if fmt == "stablehlo" else "B")
    out_shapes = {"expression_logits": [batch, int(model.config.model.num_expressions)],
                  "au_logits": [batch, len(model.aus)], "va": [batch, 2]}
    graph = fmt != "safetensors"
    content = {
        "format": fmt,
        "file": out.name,
        "metadata": dict(metadata),
        "inputs": [{"name": INPUT_NAME, "shape": [batch, size, size, 3], "dtype": "float32",
                    "layout": "NHWC",
                    "meaning": f"uint8 RGB pixel * {SCALE} + {OFFSET}"}] if graph else [],
        "outputs": [{"name": name, "shape": out_shapes[name], "dtype": "float32",
                     "meaning": meaning} for name, meaning in OUTPUTS.items()] if graph else [],
        "graph_dtype": str(model.config.model.dtype),
        "load": FORMAT_SPECS[fmt].how_to_load,
        "parity": {"batch_sizes": list(PARITY_BATCH_SIZES), "tolerance": tolerance,
                   "max_abs_diff": dict(diffs)},
        "versions": {"jax": jax.__version__, "fbnet_jax": metadata.get("fbnet.version", "")},
    }
    if fmt == "stablehlo":
        content["platforms"] = list(STABLEHLO_PLATFORMS)
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _move(staged: Path, out: Path) -> None:
    """Puts the checked artefact in place (a SavedModel directory replaces the old one)."""
    if staged.is_dir() and out.is_dir():
        shutil.rmtree(out)
    os.replace(staged, out)


def _remove(*paths: Path) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
