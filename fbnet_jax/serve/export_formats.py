"""The formats of `fbnet export`: how each writes its artefact and loads it back to run it.

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

Every graph format has one input, `INPUT_NAME`, and the outputs of `inference.OUTPUTS` in that
order. `FORMAT_SPECS` holds each format's writer, its loader (the runner `parity` checks) and how
a consumer loads it; `require` imports a format's optional packages or says how to install them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fbnet_jax.core.errors import UserError
from fbnet_jax.core.images import OFFSET, SCALE
from fbnet_jax.runtime import checkpointing
from fbnet_jax.runtime import state as state_lib
from fbnet_jax.serve.inference import OUTPUTS, InferenceModel
from fbnet_jax.serve.parity import ParityError, Runner

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


def require(fmt: str) -> list[Any]:
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


def _ordered(model: InferenceModel) -> Callable[[jax.Array], collections.OrderedDict]:
    """`model.apply` with its outputs in OUTPUTS order (a plain dict would flatten sorted)."""
    def apply(images):
        outputs = model.apply(images)
        return collections.OrderedDict((name, outputs[name]) for name in OUTPUTS)
    return apply


def _write_onnx(model: InferenceModel, path: Path, metadata: Mapping[str, str]) -> None:
    jax2onnx, onnx, _ = require("onnx")
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
    *_, ort = require("onnx")
    options = ort.SessionOptions()
    # Its "Error merging shape info ... lenient merge" warnings (NCHW/NHWC value_info) are noise.
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # pylint: disable=broad-except  # onnxruntime's own exception types
        raise ParityError(
            f"ONNX Runtime cannot load the graph jax2onnx wrote "
            f"({str(e).split('failed:')[-1].strip()}): a converter bug, not yours (known for "
            f"resnet50 with jax2onnx 0.17.1: a residual Add gets inputs of two layouts); export "
            f"this network with --format stablehlo or safetensors") from e
    return lambda x: dict(zip(OUTPUTS, session.run(list(OUTPUTS), {INPUT_NAME: x})))


def _write_stablehlo(model: InferenceModel, path: Path, metadata: Mapping[str, str]) -> None:
    del metadata  # in the sidecar JSON
    require("stablehlo")
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
    tf, = require("savedmodel")
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
    tf, = require("savedmodel")
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    return lambda x: {name: value.numpy() for name, value in serve(**{INPUT_NAME: x}).items()}


def flat_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The variables by '/'-joined name: {"params": {"head": {"kernel": w}}} ->
    {"params/head/kernel": w}, as numpy arrays."""
    return {name: np.ascontiguousarray(np.asarray(value))
            for name, value in traverse_util.flatten_dict(dict(variables), sep="/").items()}


def _write_safetensors(model: InferenceModel, path: Path, metadata: Mapping[str, str]) -> None:
    require("safetensors")
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
    require("safetensors")
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
class Format:
    """One format: its writer (model, staged path, metadata), its loader, and how to load it."""
    write: Callable[[InferenceModel, Path, Mapping[str, str]], None]
    # (artefact, the model it was written from) -> a runner of the artefact.
    load: Callable[[Path, InferenceModel], Runner]
    how_to_load: str


FORMAT_SPECS = {
    "onnx": Format(_write_onnx, lambda path, model: _load_onnx(path),
                    "onnxruntime.InferenceSession(path).run(None, {'image': x})"),
    "stablehlo": Format(
        _write_stablehlo, lambda path, model: _load_stablehlo(path),
        "jax.export.deserialize(bytearray(open(path, 'rb').read())).call(x) -> OrderedDict of "
        "the outputs (needs jax and flatbuffers; runs on cpu, cuda, rocm and tpu)"),
    "savedmodel": Format(
        _write_savedmodel, lambda path, model: _load_savedmodel(path),
        "tf.saved_model.load(path).signatures['serving_default'](image=x) -> dict of the "
        "outputs"),
    "safetensors": Format(
        _write_safetensors, _load_safetensors_runner,
        "fbnet_jax.serve.export.load_safetensors(path).apply(x) -> dict of the outputs; or "
        "safetensors.numpy.load_file(path) for the variables alone"),
}


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
