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

  onnx         one .onnx file (jax2onnx), dynamic batch dimension "B"; ONNX Runtime has no
               bfloat16/float16 convolutions, so a model trained with another `model.dtype` is
               exported computing in float32 (its parameters are float32 already), and checked
               against the JAX model computing in float32.
  stablehlo    `jax.export` serialized bytes, symbolic batch dimension "b", lowered for cpu,
               cuda, rocm and tpu; load with `jax.export.deserialize(bytearray(data)).call(x)`.
  savedmodel   a TensorFlow SavedModel directory (jax2tf), signature `serving_default`, weights
               as variables; needs TensorFlow (`pip install 'fbnet_jax[tf]'`).
  safetensors  the parameters and BatchNorm statistics, '/'-joined names
               (`params/backbone/Conv_0/kernel`, `batch_stats/backbone/BatchNorm_0/mean`), with the
               metadata in the file's header too; `load_safetensors` rebuilds the model from it.

Every export ends with a parity check: the artefact is loaded back from disk and run (ONNX
Runtime, `jax.export.deserialize`, `tf.saved_model.load`, `load_safetensors`) on synthetic faces
(`data_pipelines/synthetic.py`) in batches of 1 and 5, and compared with the JAX model. An
artefact that fails it is not moved to `out` (it is written under a temporary name first).

Tolerance: an output may differ by at most tol · (1 + |JAX value|), tol by the graph's dtype
(`TOLERANCE`). In float32, runtimes sum convolutions and matrix products in other orders (ONNX
Runtime's kernels, fused BatchNorm, XLA's own fusions), which moves each layer's result by a few
units in the last place: differences of about 1e-6 on these networks (at most 7e-7 measured on
the tiny small_cnn, ONNX and SavedModel). 1e-4 leaves two orders of magnitude for deeper networks
and larger logits, while the mistakes the check is there for move outputs by far more: on the
tiny model after 2 steps, BatchNorm on batch statistics by up to 1.7, pixels scaled by 1/255
instead of the model's scaling by 0.78, BGR instead of RGB by 0.47. bfloat16 keeps 8 significant
bits (steps of 2^-8 ≈ 4e-3 relative) and float16 11 (≈ 5e-4), so a few roundings taken in
another order allow 3e-2 and 5e-3. safetensors runs the same JAX function on the same weights
read back bit for bit, so it must agree exactly (tolerance 0).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from data_pipelines import schema, synthetic
from fbnet_jax.runtime import checkpointing
from fbnet_jax.runtime import state as state_lib
from fbnet_jax.core.errors import EXIT_FAILED, UserError
from fbnet_jax.serve.inference import OFFSET, OUTPUTS, SCALE, InferenceModel

log = logging.getLogger(__name__)

FORMATS = ("onnx", "stablehlo", "savedmodel", "safetensors")
INPUT_NAME = "image"
ONNX_BATCH_DIM = "B"
STABLEHLO_BATCH_DIM = "b"
STABLEHLO_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# Optional packages of each format and the extra that installs them (setup.cfg).
DEPENDENCIES = {
    "onnx": (("jax2onnx", "onnx", "onnxruntime"), "export"),
    "stablehlo": (("flatbuffers",), "export"),
    "savedmodel": (("tensorflow",), "tf"),
    "safetensors": (("safetensors",), "export"),
}
# Parity check: batch sizes (1 and another, so the batch dimension is shown to be dynamic),
# the synthetic faces' seed, and the tolerance per graph dtype (module docstring).
PARITY_BATCH_SIZES = (1, 5)
PARITY_SEED = 2019
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}

Runner = Callable[[np.ndarray], Mapping[str, Any]]


class ParityError(UserError, RuntimeError):
    """An exported artefact does not reproduce the JAX model; nothing is left at the output path.

    A bug (of a converter or of this project), not a user mistake; the message names the output
    and the difference, all the user can act on (another format or dtype, a report): `fbnet`
    prints it as one line and exits with status 1.
    """

    exit_code = EXIT_FAILED


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
      tolerance: tol of the check (module docstring).
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
    writer = _FORMATS[fmt]
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
    _require(fmt)


def _require(fmt: str) -> list[Any]:
    """The optional modules of `fmt`, imported; a UserError naming the extra if one is missing."""
    names, extra = DEPENDENCIES[fmt]
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as e:
            raise UserError(f"--format {fmt} needs the {name} package, which cannot be imported "
                            f"({e}): pip install 'fbnet_jax[{extra}]'") from e
    return modules


# --------------------------------------------------------------------------------------------
# Parity check.

def parity_faces(image_size: int, count: int = max(PARITY_BATCH_SIZES)) -> np.ndarray:
    """`count` synthetic faces rendered at the model's size: uint8 [count, S, S, 3]."""
    source = synthetic.SyntheticFaces(
        synthetic.SyntheticSpec(num_records=count, seed=PARITY_SEED, image_size=image_size),
        split="test")
    return np.stack([source[i][schema.IMAGE] for i in range(count)])


def check_parity(model: InferenceModel, run: Runner, tolerance: float,
                 what: str) -> dict[str, float]:
    """Compares `run` (an exported artefact) with `model.apply` on synthetic faces.

    Returns:
      Per output (OUTPUTS order), the largest absolute difference over every batch size.

    Raises:
      ParityError: an output is missing, has another shape, or differs by more than
        tolerance · (1 + |JAX value|) anywhere (NaN included).
    """
    images = model.preprocess(parity_faces(model.image_size))
    reference = jax.jit(model.apply)
    worst = dict.fromkeys(OUTPUTS, 0.0)
    for size in PARITY_BATCH_SIZES:
        want = {name: np.asarray(value) for name, value in reference(images[:size]).items()}
        got = run(images[:size])
        for name in OUTPUTS:
            value = np.asarray(got[name]) if name in got else None
            if value is None or value.shape != want[name].shape:
                shape = "missing" if value is None else f"shape {list(value.shape)}"
                raise ParityError(f"{what}: output {name} is {shape} for a batch of {size}, "
                                  f"expected {list(want[name].shape)}")
            # NaN compares false, so a NaN output fails too (and is reported as inf).
            diff = np.nan_to_num(np.abs(value.astype(np.float64) - want[name]), nan=np.inf,
                                 posinf=np.inf)
            if not np.all(diff <= tolerance * (1.0 + np.abs(want[name]))):
                raise ParityError(
                    f"{what}: output {name} differs from the JAX model by up to "
                    f"{diff.max():.3g} on a batch of {size}; tolerance "
                    f"{tolerance:g}·(1 + |value|)")
            worst[name] = max(worst[name], float(diff.max()))
    return worst


# --------------------------------------------------------------------------------------------
# The formats: each writes its artefact and loads it back as a runner for the parity check.

def _ordered(model: InferenceModel) -> Callable[[jax.Array], collections.OrderedDict]:
    """`model.apply` with its outputs in OUTPUTS order (a plain dict would flatten sorted)."""
    def apply(images):
        outputs = model.apply(images)
        return collections.OrderedDict((name, outputs[name]) for name in OUTPUTS)
    return apply


def _write_onnx(model: InferenceModel, path: Path, metadata: Mapping[str, str]) -> None:
    jax2onnx, onnx, _ = _require("onnx")
    size = model.image_size
    apply = _ordered(model)
    # onnx_ir warns about the value types of shape constants it leaves untyped (harmless), and
    # jax2onnx logs its arguments at INFO.
    with _quiet("onnx_ir"), _quiet("jax2onnx"):
        proto = jax2onnx.to_onnx(lambda x: tuple(apply(x).values()),
                                 [(ONNX_BATCH_DIM, size, size, 3)], model_name="fbnet",
                                 input_names=[INPUT_NAME], output_names=list(OUTPUTS))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = (f"FaceBehaviorNet (fbnet_jax). Input {INPUT_NAME}: float32 "
                        f"[{ONNX_BATCH_DIM}, {size}, {size}, 3] = uint8 RGB * {SCALE} + "
                        f"{OFFSET}. Outputs: {', '.join(OUTPUTS)}. See metadata_props fbnet.*.")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _load_onnx(path: Path) -> Runner:
    *_, ort = _require("onnx")
    options = ort.SessionOptions()
    # Its "Error merging shape info ... lenient merge" warnings (NCHW/NHWC value_info) are noise.
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # pylint: disable=broad-except  # onnxruntime's own exception types
        raise ParityError(
            f"ONNX Runtime cannot load the graph jax2onnx wrote "
            f"({str(e).split('failed:')[-1].strip()}): a converter bug, not yours (known for resnet50 with jax2onnx 0.17.1: a residual Add gets inputs of "
            f"two layouts); export this network with --format stablehlo or safetensors") from e
    return lambda x: dict(zip(OUTPUTS, session.run(list(OUTPUTS), {INPUT_NAME: x})))


def _write_stablehlo(model: InferenceModel, path: Path, metadata: Mapping[str, str]) -> None:
    del metadata  # in the sidecar JSON
    _require("stablehlo")
    batch, = jax.export.symbolic_shape(STABLEHLO_BATCH_DIM)
    size = model.image_size
    exported = jax.export.export(jax.jit(_ordered(model)), platforms=STABLEHLO_PLATFORMS)(
        jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32))
    path.write_bytes(exported.serialize())


def _load_stablehlo(path: Path) -> Runner:
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    return exported.call


def _write_savedmodel(model: InferenceModel, path: Path, metadata: Mapping[str, str]) -> None:
    del metadata  # in the sidecar JSON
    tf, = _require("savedmodel")
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
    size = model.image_size
    # Weights as variables, not graph constants: a GraphDef is limited to 2 GB.
    variables = tf.nest.map_structure(lambda v: tf.Variable(v, trainable=False),
                                      jax.tree.map(np.asarray, dict(model.variables)))
    convert = jax2tf.convert(lambda v, x: dict(model.apply(x, v)),
                             polymorphic_shapes=[None, f"(b, {size}, {size}, 3)"],
                             with_gradient=False)

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, size, size, 3], tf.float32, name=INPUT_NAME)])
    def serve(image):
        return convert(variables, image)

    module = tf.Module()
    module.model_variables = tf.nest.flatten(variables)  # tracked, so saved with the module
    module.serve = serve
    with _quiet("tensorflow"):  # its INFO line names the temporary directory
        tf.saved_model.save(module, str(path), signatures={"serving_default": serve})


def _load_savedmodel(path: Path) -> Runner:
    tf, = _require("savedmodel")
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    return lambda x: {name: value.numpy() for name, value in serve(**{INPUT_NAME: x}).items()}


def flat_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The variables by '/'-joined name: {"params": {"head": {"kernel": w}}} ->
    {"params/head/kernel": w}, as numpy arrays."""
    return {name: np.ascontiguousarray(np.asarray(value))
            for name, value in traverse_util.flatten_dict(dict(variables), sep="/").items()}


def _write_safetensors(model: InferenceModel, path: Path, metadata: Mapping[str, str]) -> None:
    _require("safetensors")
    from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
    # Bytes written here rather than by save_file, which makes the file readable by its owner
    # alone.
    path.write_bytes(save(flat_variables(model.variables), metadata=dict(metadata)))


def _load_safetensors_runner(path: Path, model: InferenceModel) -> Runner:
    loaded = load_safetensors(path)
    restored = flat_variables(loaded.variables)
    for name, value in flat_variables(model.variables).items():
        if not np.array_equal(value, restored[name]):
            raise ParityError(f"safetensors export: {name} does not read back as written")
    return jax.jit(loaded.apply)


def load_safetensors(path: str | Path) -> InferenceModel:
    """The network of a safetensors export: the model rebuilt from the config in the file's
    header (`fbnet.config`), its variables filled from the tensors.

    Raises:
      UserError: the file cannot be read, is not an fbnet_jax export, or its tensors do not fit
        the network its config describes.
    """
    _require("safetensors")
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # pylint: disable=broad-except  # safetensors raises its own kinds
        raise UserError(f"{path}: cannot be read as safetensors ({e})") from e
    if "fbnet.config" not in metadata or "fbnet.step" not in metadata:
        raise UserError(f"{path}: not an fbnet_jax export (its header has no fbnet.config and "
                        f"fbnet.step); write one with fbnet export --format safetensors")
    try:
        config = checkpointing.config_from_json(json.loads(metadata["fbnet.config"]))
        model = state_lib.model_for(config)
        size, step = int(config.data.image_size), int(metadata["fbnet.step"])
    except (ValueError, KeyError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path}: the config or step in its header cannot be used "
                        f"({type(e).__name__}: {e})") from e
    expected = traverse_util.flatten_dict(jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False)), sep="/")
    problems = [f"{name}: missing" for name in sorted(set(expected) - set(tensors))]
    problems += [f"{name}: not a variable of the network" for name in
                 sorted(set(tensors) - set(expected))]
    problems += [f"{name}: shape {list(tensors[name].shape)}, the network's is "
                 f"{list(expected[name].shape)}" for name in sorted(set(expected) & set(tensors))
                 if tensors[name].shape != expected[name].shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{path}: the tensors do not fit the network of its config: "
                        f"{'; '.join(problems[:3])}{more}")
    variables = traverse_util.unflatten_dict(tensors, sep="/")
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    return InferenceModel(config=config, step=step, model=model, variables=variables)


@dataclasses.dataclass(frozen=True)
class _Format:
    write: Callable[[InferenceModel, Path, Mapping[str, str]], None]
    # (artefact, the model it was written from) -> a runner of the artefact.
    load: Callable[[Path, InferenceModel], Runner]
    how_to_load: str


_FORMATS = {
    "onnx": _Format(_write_onnx, lambda path, model: _load_onnx(path),
                    "onnxruntime.InferenceSession(path).run(None, {'image': x})"),
    "stablehlo": _Format(
        _write_stablehlo, lambda path, model: _load_stablehlo(path),
        "jax.export.deserialize(bytearray(open(path, 'rb').read())).call(x) -> OrderedDict of "
        "the outputs (needs jax and flatbuffers; runs on cpu, cuda, rocm and tpu)"),
    "savedmodel": _Format(
        _write_savedmodel, lambda path, model: _load_savedmodel(path),
        "tf.saved_model.load(path).signatures['serving_default'](image=x) -> dict of the "
        "outputs"),
    "safetensors": _Format(
        _write_safetensors, _load_safetensors_runner,
        "fbnet_jax.serve.export.load_safetensors(path).apply(x) -> dict of the outputs; or "
        "safetensors.numpy.load_file(path) for the variables alone"),
}


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
        "load": _FORMATS[fmt].how_to_load,
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


@contextlib.contextmanager
def _quiet(package: str) -> Iterator[None]:
    """Shows only the errors that `package` logs inside the block, through its own loggers or
    through the root logger (jax2onnx logs its arguments with `logging.info`)."""
    logger = logging.getLogger(package)
    level = logger.level
    folder = f"{os.sep}{package}{os.sep}"

    def only_errors(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or folder not in record.pathname

    root = logging.getLogger()
    logger.setLevel(logging.ERROR)
    root.addFilter(only_errors)
    try:
        yield
    finally:
        root.removeFilter(only_errors)
        logger.setLevel(level)
