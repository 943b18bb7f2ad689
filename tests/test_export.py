"""Export (fbnet_jax/serve/export.py): every format reproduces the JAX model of a tiny trained run.

One tiny run per module; each export is checked here again, independently of export's own parity
check: the artefact is loaded the way its consumer would load it and run on a batch size that
export did not use (3), so the batch dimension is shown to be dynamic.
"""

import dataclasses
import json
import os
import sys

import jax
import numpy as np
import pytest

from conftest import load_config, run_isolated, train_tiny_run
from fbnet_jax.core.version import __version__
from fbnet_jax.serve import export, export_formats
from fbnet_jax.core import taxonomy
from fbnet_jax.runtime import state as state_lib
from fbnet_jax.core.errors import UserError
from fbnet_jax.serve.inference import OUTPUTS, InferenceModel

STEPS = 2
SIZE = 32  # the tiny config's image size
PREPROCESSING = {"image_size": SIZE, "layout": "NHWC", "channels": "RGB", "scale": 0.0078125,
                 "offset": -1.0, "formula": "model input = uint8 pixel * scale + offset"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("run"), STEPS)


@pytest.fixture(scope="module")
def model(workdir):
    return InferenceModel.from_workdir(workdir)


@pytest.fixture(scope="module")
def faces():
    """3 uint8 faces: a batch size the export's own check does not use."""
    return export.parity_faces(SIZE, 3)


@pytest.fixture(scope="module")
def expected(model, faces):
    return {name: np.asarray(value) for name, value in
            model.apply(model.preprocess(faces)).items()}


@pytest.fixture(scope="module")
def onnx_report(model, tmp_path_factory):
    return export.export(model, "onnx", tmp_path_factory.mktemp("onnx") / "model.onnx")


def _assert_close(got, expected, atol=1e-5):
    assert list(got) == list(OUTPUTS)
    for name in OUTPUTS:
        np.testing.assert_allclose(np.asarray(got[name]), expected[name], rtol=1e-5, atol=atol,
                                   err_msg=name)


def test_the_tiny_run_is_what_the_tests_expect(model):
    assert (model.step, model.image_size, model.aus) == (STEPS, SIZE, taxonomy.AUS)
    assert model.metadata()["fbnet.version"] == __version__


def test_onnx_graph_has_named_io_a_dynamic_batch_and_the_metadata(onnx_report, model, faces,
                                                                  expected):
    import onnx  # pylint: disable=g-import-not-at-top
    import onnxruntime as ort  # pylint: disable=g-import-not-at-top
    proto = onnx.load(str(onnx_report.path))
    [image] = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert (image.name, dims) == ("image", ["B", SIZE, SIZE, 3])
    assert [o.name for o in proto.graph.output] == list(OUTPUTS)
    assert {p.key: p.value for p in proto.metadata_props} == model.metadata()
    session = ort.InferenceSession(str(onnx_report.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": model.preprocess(faces)})
    _assert_close(dict(zip(OUTPUTS, got)), expected)
    assert onnx_report.files == (onnx_report.path,)
    assert onnx_report.size_bytes == os.path.getsize(onnx_report.path)
    assert list(onnx_report.max_abs_diff) == list(OUTPUTS)
    assert 0 < max(onnx_report.max_abs_diff.values()) < 1e-5
    assert onnx_report.graph_dtype == "float32" and onnx_report.tolerance == 1e-4


# A consumer of the .onnx file alone: onnx, onnxruntime and numpy, no fbnet code and no JAX.
CONSUMER = """
import json, sys
import numpy as np, onnx, onnxruntime as ort
path, faces_path, out_path = sys.argv[1:]
meta = {p.key: p.value for p in onnx.load(path).metadata_props}
pre = json.loads(meta["fbnet.preprocessing"])
faces = np.load(faces_path)
assert faces.dtype == np.uint8 and faces.shape[1:] == (pre["image_size"], pre["image_size"], 3)
x = faces.astype(np.float32) * np.float32(pre["scale"]) + np.float32(pre["offset"])
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
names = list(json.loads(meta["fbnet.outputs"]))
np.savez(out_path, **dict(zip(names, session.run(names, {"image": x}))))
assert not any(m.split(".")[0] in ("fbnet_jax", "data_pipelines", "jax") for m in sys.modules)
print(json.dumps({"aus": json.loads(meta["fbnet.aus"]), "step": meta["fbnet.step"],
                  "expressions": json.loads(meta["fbnet.expressions"]), "preprocessing": pre}))
"""


def test_a_consumer_of_the_onnx_file_alone_reproduces_the_model(onnx_report, faces, expected,
                                                                 tmp_path):
    np.save(tmp_path / "faces.npy", faces)
    stdout = run_isolated(CONSUMER, args=(str(onnx_report.path), str(tmp_path / "faces.npy"),
                                          str(tmp_path / "out.npz")))
    assert json.loads(stdout) == {"aus": list(taxonomy.AUS), "step": str(STEPS),
                                  "expressions": list(taxonomy.EXPRESSIONS),
                                  "preprocessing": PREPROCESSING}
    with np.load(tmp_path / "out.npz") as got:
        _assert_close({name: got[name] for name in got.files}, expected)


def test_onnx_of_a_bfloat16_model_computes_in_float32(model, tmp_path):
    config = model.config.copy_and_resolve_references()
    config.model.dtype = "bfloat16"
    bf16 = dataclasses.replace(model, config=config, model=state_lib.model_for(config))
    report = export.export(bf16, "onnx", tmp_path / "bf16.onnx")
    assert (report.graph_dtype, report.tolerance) == ("float32", 1e-4)
    assert max(report.max_abs_diff.values()) < 1e-5
    import onnx  # pylint: disable=g-import-not-at-top
    metadata = {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}
    assert json.loads(metadata["fbnet.config"])["model"]["dtype"] == "bfloat16"


def test_stablehlo_round_trips_with_a_symbolic_batch(model, faces, expected, tmp_path):
    import jax  # pylint: disable=g-import-not-at-top
    report = export.export(model, "stablehlo", tmp_path / "model.stablehlo")
    sidecar = tmp_path / "model.stablehlo.json"
    assert report.files == (tmp_path / "model.stablehlo", sidecar)
    assert sorted(os.listdir(tmp_path)) == ["model.stablehlo", "model.stablehlo.json"]
    exported = jax.export.deserialize(bytearray(report.path.read_bytes()))
    assert str(exported.in_avals[0].shape) == f"(b, {SIZE}, {SIZE}, 3)"
    assert exported.platforms == ("cpu", "cuda", "rocm", "tpu")
    _assert_close(exported.call(model.preprocess(faces)), expected)
    info = json.loads(sidecar.read_text())
    assert info["metadata"] == model.metadata()
    assert info["inputs"] == [{"name": "image", "shape": ["b", SIZE, SIZE, 3], "dtype": "float32",
                               "layout": "NHWC", "meaning": "uint8 RGB pixel * 0.0078125 + -1.0"}]
    assert [(o["name"], o["shape"], o["dtype"]) for o in info["outputs"]] == [
        ("expression_logits", ["b", 7], "float32"), ("au_logits", ["b", 17], "float32"),
        ("va", ["b", 2], "float32")]
    assert (info["format"], info["file"], info["graph_dtype"]) == (
        "stablehlo", "model.stablehlo", "float32")
    assert info["parity"] == {"batch_sizes": [1, 5], "tolerance": 1e-4,
                              "max_abs_diff": dict(report.max_abs_diff)}


def test_safetensors_round_trips_exactly(model, faces, expected, tmp_path):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    report = export.export(model, "safetensors", tmp_path / "model.safetensors")
    assert report.max_abs_diff == dict.fromkeys(OUTPUTS, 0.0) and report.tolerance == 0.0
    with safe_open(str(report.path), framework="numpy") as f:
        assert f.metadata() == model.metadata()
        kernel = f.get_tensor("params/backbone/Conv_0/kernel")
        mean = f.get_tensor("batch_stats/backbone/BatchNorm_1/mean")
        assert len(list(f.keys())) == 18
    np.testing.assert_array_equal(kernel, model.variables["params"]["backbone"]["Conv_0"]["kernel"])
    np.testing.assert_array_equal(
        mean, model.variables["batch_stats"]["backbone"]["BatchNorm_1"]["mean"])
    loaded = export.load_safetensors(report.path)
    assert loaded.step == STEPS and loaded.config.to_json() == model.config.to_json()
    assert loaded.metadata() == model.metadata()
    got = {name: np.asarray(value) for name, value in
           loaded.apply(loaded.preprocess(faces)).items()}
    for name in OUTPUTS:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    info = json.loads((tmp_path / "model.safetensors.json").read_text())
    assert info["metadata"] == model.metadata() and info["inputs"] == info["outputs"] == []


def test_load_safetensors_refuses_files_that_are_not_an_export_of_the_network(model, tmp_path):
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    plain = tmp_path / "plain.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(plain))
    with pytest.raises(UserError) as e:
        export.load_safetensors(plain)
    assert str(e.value) == (f"{plain}: not an fbnet_jax export (its header has no fbnet.config "
                            f"and fbnet.step); write one with fbnet export --format safetensors")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"params/backbone/Conv_0/kernel": np.zeros((3, 3, 3, 4), np.float32),
               "params/extra": np.zeros(1, np.float32)}, str(wrong), metadata=model.metadata())
    with pytest.raises(UserError) as e:
        export.load_safetensors(wrong)
    assert str(e.value) == (
        f"{wrong}: the tensors do not fit the network of its config: "
        f"batch_stats/backbone/BatchNorm_0/mean: missing; "
        f"batch_stats/backbone/BatchNorm_0/var: missing; "
        f"batch_stats/backbone/BatchNorm_1/mean: missing (and 16 more)")
    broken = tmp_path / "broken.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(broken),
              metadata={**model.metadata(), "fbnet.config": "{not json"})
    with pytest.raises(UserError, match="broken.safetensors: the config or step in its header "
                                        "cannot be used \\(JSONDecodeError: "):
        export.load_safetensors(broken)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="junk.safetensors: cannot be read as safetensors"):
        export.load_safetensors(tmp_path / "junk.safetensors")


def test_an_artefact_that_fails_the_parity_check_is_not_written(model, monkeypatch, tmp_path):
    good = export_formats.FORMAT_SPECS["stablehlo"]

    def load_shifted(path, graph_model):
        run = good.load(path, graph_model)
        return lambda x: {**run(x), "va": np.asarray(run(x)["va"]) + 1e-3}

    monkeypatch.setitem(export_formats.FORMAT_SPECS, "stablehlo",
                        dataclasses.replace(good, load=load_shifted))
    with pytest.raises(export.ParityError) as e:
        export.export(model, "stablehlo", tmp_path / "model.stablehlo")
    assert str(e.value).startswith("stablehlo export: output va differs from the JAX model by "
                                   "up to 0.001 on a batch of 1; tolerance 0.0001·(1 + |value|)")
    assert not os.listdir(tmp_path)


def test_savedmodel_without_tensorflow_says_how_to_install_it(model, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` fails
    with pytest.raises(UserError) as e:
        export.export(model, "savedmodel", tmp_path / "saved")
    assert str(e.value).startswith("--format savedmodel needs the tensorflow package, which "
                                   "cannot be imported (")
    assert str(e.value).endswith("): pip install 'fbnet_jax[tf]'")
    # `fbnet export` says so before it reads a checkpoint (this one does not exist).
    assert _message(export.run_command, str(tmp_path / "no_run"), None, None, "savedmodel",
                    str(tmp_path / "saved")) == str(e.value)
    assert not os.listdir(tmp_path)


def test_savedmodel_round_trips_where_tensorflow_is_installed(model, faces, expected, tmp_path):
    tf = pytest.importorskip("tensorflow")  # the optional extra fbnet_jax[tf]
    report = export.export(model, "savedmodel", tmp_path / "saved")
    assert report.files == (tmp_path / "saved", tmp_path / "saved.json")
    assert max(report.max_abs_diff.values()) < 1e-5
    serve = tf.saved_model.load(str(report.path)).signatures["serving_default"]
    got = serve(image=tf.constant(model.preprocess(faces)))
    _assert_close({name: got[name].numpy() for name in OUTPUTS}, expected)
    export.export(model, "savedmodel", tmp_path / "saved")  # replaces the SavedModel
    assert sorted(os.listdir(tmp_path)) == ["saved", "saved.json"]


def test_run_command_exports_a_run_or_a_checkpoint_directory(workdir, model, tmp_path):
    assert export.run_command(str(workdir), None, STEPS, "stablehlo", str(tmp_path / "a")) == 0
    assert (tmp_path / "a").is_file() and (tmp_path / "a.json").is_file()
    checkpoint = workdir / "checkpoints" / str(STEPS)
    assert export.run_command(None, str(checkpoint), None, "safetensors",
                              str(tmp_path / "b.safetensors")) == 0
    assert export.load_safetensors(tmp_path / "b.safetensors").metadata() == model.metadata()


def _message(call, *args) -> str:
    with pytest.raises(UserError) as e:
        call(*args)
    return str(e.value)


def test_user_mistakes_get_one_line(workdir, model, tmp_path):
    run = export.run_command
    assert _message(export.export, model, "tflite", tmp_path / "m") == (
        "--format 'tflite': unknown; one of onnx, stablehlo, savedmodel, safetensors")
    assert _message(export.export, model, "onnx", tmp_path) == (
        f"--out {tmp_path}: is a directory; --format onnx writes a file "
        f"(e.g. {tmp_path / 'model.onnx'})")
    assert _message(export.export, model, "stablehlo", tmp_path / "no" / "m") == (
        f"--out {tmp_path / 'no' / 'm'}: {tmp_path / 'no'} is not a directory")
    (tmp_path / "file").write_text("x")
    assert _message(export.export, model, "savedmodel", tmp_path / "file") == (
        f"--out {tmp_path / 'file'}: is a file; a SavedModel is a directory")
    assert _message(export.export, model, "savedmodel", tmp_path) == (
        f"--out {tmp_path}: a directory that is not empty and holds no SavedModel "
        f"(saved_model.pb); give a new directory")
    (tmp_path / "m.json").mkdir()
    assert _message(export.export, model, "safetensors", tmp_path / "m") == (
        f"--out {tmp_path / 'm'}: {tmp_path / 'm.json'} (the metadata written beside it) is a "
        f"directory")
    both = ("fbnet export needs --workdir DIR (of a training run, with --step N to pick a "
            "checkpoint) or --checkpoint PATH, one of the two")
    assert _message(run, None, None, None, "onnx", "m.onnx") == both
    assert _message(run, str(workdir), str(workdir), None, "onnx", "m.onnx") == both
    assert _message(run, None, str(workdir), 2, "onnx", "m.onnx") == (
        "--step goes with --workdir; a --checkpoint directory is one step already")
    assert _message(run, str(workdir), None, None, None, "m.onnx") == (
        "fbnet export needs --format, one of onnx, stablehlo, savedmodel, safetensors")
    assert _message(run, str(workdir), None, None, "onnx", None) == (
        "fbnet export needs --out PATH (where the exported model is written)")
    assert _message(run, str(workdir), None, 7, "onnx", str(tmp_path / "m.onnx")) == (
        f"--step 7: the run in {workdir} has no checkpoint of that step; it has {STEPS}")
    assert sorted(os.listdir(tmp_path)) == ["file", "m.json"]


@pytest.mark.slow
def test_resnet50_onnx_export_fails_with_a_clear_message(tmp_path):
    # jax2onnx 0.17.1 writes a graph ONNX Runtime refuses (a residual Add with inputs in two
    # layouts): the export says so in one line and leaves nothing behind.
    config = load_config("synthetic.py", "tiny")
    config.model.backbone = "resnet50"
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    model, _, _, state = state_lib.create_state(config, mesh)
    network = InferenceModel(
        config=config, step=0, model=model,
        variables={"params": jax.device_get(state.params),
                   "batch_stats": jax.device_get(state.batch_stats)})
    with pytest.raises(export.ParityError, match=r"ONNX Runtime cannot load the graph jax2onnx "
                                                 r"wrote .*export this network with --format "
                                                 r"stablehlo or safetensors"):
        export.export(network, "onnx", tmp_path / "r50.onnx")
    assert list(tmp_path.iterdir()) == []
