"""Inference throughput and start-up: the JAX network against its ONNX export in ONNX Runtime.

For each backbone, builds the inference network (`InferenceModel`) from a freshly initialised
state (random weights cost the same as trained ones), exports it with
`fbnet_jax.serve.export.export(model, "onnx", path)` (which checks the artefact against JAX), and
measures, side by side in one process and on the same inputs (synthetic faces at the model's
size, `export.parity_faces`, preprocessed by `InferenceModel.preprocess`):

  JAX        `jax.jit` of `InferenceModel.apply`, the variables passed as an argument (as
             `Predictor` does), on the float32 model input; results fetched to numpy.
  ORT        `onnxruntime.InferenceSession` of the exported file, CPUExecutionProvider, default
             session options (ORT's own intra-op thread count), on the same float32 array.
  Predictor  `fbnet_jax.serve.predict.Predictor.predict` on the uint8 faces those inputs were made
             from: the JAX network plus the input pipeline's resize (a pass-through at the
             model's size), scaling, padding to the batch size and softmax/sigmoid.

Throughput: images per second at each batch size; every repeat times each runtime in turn
(JAX, ORT, Predictor) for about `--seconds` each, so a machine whose speed drifts moves all
three alike. The table gives the medians over repeats and the median (range) of the per-repeat
ratio JAX/ORT: above 1, JAX serves more images per second; below 1, ONNX Runtime does.

Start-up: the time from a network in memory to its first result at that batch size, fresh
each time (JAX's in-memory caches cleared, no persistent compilation cache; a new ORT session
read from the file), medians over `--startup_repeats`, taken in turn:
  JAX  `lower` (tracing to StableHLO) + `compile` (XLA) + the first call;
  ORT  `InferenceSession(path)` (reading the file, weights included, from the page cache, and
       ORT's graph optimisations) + the first run.
JAX's variables are already in memory; restoring them from a checkpoint is timed below.

End to end: whole processes, wall seconds, medians (range) over `--predict_repeats` rounds after
one untimed warm-up run, the processes of a round taken in turn:
  imports alone     `python -c "import fbnet_jax.cli.main, fbnet_jax.serve.predict"` (jax, flax,
                    orbax, OpenCV, grain): the part of the start-up that is not the network's;
  1 image           `fbnet predict --no-detect` on a folder of 1 synthetic face crop (PNG, the
                    model's size), with a checkpoint of the fresh state written by
                    `checkpointing.save`; the lone image is padded to a batch of 32 (the
                    default `--batch_size`);
  1 image, batch 1  the same with `--batch_size 1`;
  N images          the same on `--predict_images` crops.
The difference per extra image (N images minus 1 image) is what an image costs once the process
is up. Restoring the checkpoint (`InferenceModel.from_workdir`) is also timed in this process,
once per round.

  python benchmarks/predict_throughput.py                  # small_cnn and vgg_face
  python benchmarks/predict_throughput.py --backbones small_cnn,vgg_face,resnet50

The backbones' configs (as in benchmarks/compile_memory.py), all float32:
  small_cnn  configs/synthetic.py            (64 px)
  vgg_face   configs/paper_vgg.py:synthetic  (112 px)
  resnet50   configs/paper_vgg.py:synthetic with `model.backbone = "resnet50"` (112 px)
A backbone whose export fails (or fails its parity check) gets no row; the reason is printed
under the tables.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import onnxruntime as ort
from PIL import Image

from fbnet_jax.runtime import checkpointing, parallel
from fbnet_jax.core import config_files, runtime_defaults
from fbnet_jax.serve import export
from fbnet_jax.runtime import state as state_lib
from fbnet_jax.serve.inference import OUTPUTS, InferenceModel
from fbnet_jax.serve.predict import Predictor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling train_throughput.py
import train_throughput  # noqa: E402  pylint: disable=wrong-import-position

REPO = Path(__file__).resolve().parents[1]

# backbone -> the config its network is built from (which also gives the image size).
CONFIGS = {
    "small_cnn": "configs/synthetic.py",
    "vgg_face": "configs/paper_vgg.py:synthetic",
    "resnet50": "configs/paper_vgg.py:synthetic",
}
BATCH_SIZES = (1, 32)
PACKAGES = ("jax", "jaxlib", "onnxruntime", "onnx", "jax2onnx", "flax")


def load_config(backbone: str):
    """The backbone's config, float32, with no pretrained weights to read (they would be
    replaced by the fresh state anyway)."""
    config = config_files.load(str(REPO / CONFIGS[backbone]))
    config.model.backbone = backbone
    config.model.dtype = "float32"
    config.model.init_from = ""
    return config


def fresh_network(config):
    """(the train state, the InferenceModel of it) from a freshly initialised state."""
    mesh = parallel.create_mesh()
    model, _, _, state = state_lib.create_state(config, mesh, init_from=False)
    variables = {"params": jax.device_get(state.params),
                 "batch_stats": jax.device_get(state.batch_stats)}
    return state, InferenceModel(config=config, step=0, model=model, variables=variables)


def ort_session(path: Path) -> ort.InferenceSession:
    """A session with default options (threads, graph optimisations), as export's check makes
    it: on the CPU provider, its shape-merge warnings silenced."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_runner(session: ort.InferenceSession):
    names = list(OUTPUTS)
    return lambda x: session.run(names, {export.INPUT_NAME: x})


def jax_apply(model: InferenceModel):
    """The jitted network with the variables as an argument (not folded into the program)."""
    return jax.jit(lambda variables, images: model.apply(images, variables))


# --------------------------------------------------------------------------------------------
# Start-up.

def jax_startup(model: InferenceModel, variables, images: np.ndarray) -> dict[str, float]:
    """Seconds of lower, compile and the first call of a fresh jit of the network."""
    jax.clear_caches()  # a repeat must trace and compile again, not hit the in-memory cache
    fn = jax_apply(model)
    start = time.perf_counter()
    lowered = fn.lower(variables, images)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    jax.device_get(compiled(variables, images))
    done = time.perf_counter()
    return {"lower": lowered_at - start, "compile": compiled_at - lowered_at,
            "first": done - compiled_at, "total": done - start}


def ort_startup(path: Path, images: np.ndarray) -> dict[str, float]:
    """Seconds of creating a session from the file and of its first run."""
    start = time.perf_counter()
    session = ort_session(path)
    created = time.perf_counter()
    ort_runner(session)(images)
    done = time.perf_counter()
    return {"session": created - start, "first": done - created, "total": done - start}


def startup(model, variables, path: Path, images: np.ndarray, repeats: int) -> dict:
    """Median start-up of each runtime over `repeats` (taken in turn), per part."""
    runs = {"jax": [], "ort": []}
    for _ in range(repeats):
        runs["jax"].append(jax_startup(model, variables, images))
        runs["ort"].append(ort_startup(path, images))
    return {name: {part: statistics.median(r[part] for r in rows) for part in rows[0]}
            for name, rows in runs.items()}


# --------------------------------------------------------------------------------------------
# Throughput.

def calls_for(run, seconds: float) -> int:
    """How many calls of `run` (warmed up) take about `seconds`; at least 1 (VGG-FACE at batch
    32 takes seconds per call on 2 cores)."""
    start = time.perf_counter()
    run()
    return max(1, round(seconds / max(time.perf_counter() - start, 1e-6)))


def images_per_second(run, calls: int, batch: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return calls * batch / (time.perf_counter() - start)


def throughput(runners: dict, batch: int, repeats: int, seconds: float) -> dict:
    """Per runner, images/s of every repeat, the runners timed in turn within each repeat."""
    for run in runners.values():  # warm-up: compilation, allocations, caches
        run()
    calls = {name: calls_for(run, seconds) for name, run in runners.items()}
    rates = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            rates[name].append(images_per_second(run, calls[name], batch))
    return rates


def max_difference(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def measure(backbone: str, model: InferenceModel, onnx_path: Path, args) -> list[dict]:
    """The table's rows of one backbone: one per batch size."""
    faces = export.parity_faces(model.image_size, max(BATCH_SIZES))
    inputs = model.preprocess(faces)
    variables = jax.device_put(model.variables)
    rows = []
    for batch in BATCH_SIZES:
        images, crops = inputs[:batch], faces[:batch]
        started = startup(model, variables, onnx_path, images, args.startup_repeats)
        jitted, session = jax_apply(model), ort_session(onnx_path)
        predictor = Predictor(model, batch_size=batch)
        run_ort = ort_runner(session)
        runners = {
            "jax": lambda: jax.device_get(jitted(variables, images)),
            "ort": lambda: run_ort(images),
            "predictor": lambda: predictor.predict(crops),
        }
        rates = throughput(runners, batch, args.repeats, args.seconds)
        jax_out = runners["jax"]()
        diff = max_difference([jax_out[name] for name in OUTPUTS], runners["ort"]())
        ratios = [j / o for j, o in zip(rates["jax"], rates["ort"])]
        rows.append(dict(backbone=backbone, size=model.image_size, batch=batch,
                         rates={k: statistics.median(v) for k, v in rates.items()},
                         ratio=statistics.median(ratios), ratio_range=(min(ratios), max(ratios)),
                         startup=started, diff=diff))
        print(f"{backbone} batch {batch}: JAX {rows[-1]['rates']['jax']:.1f} img/s, ORT "
              f"{rows[-1]['rates']['ort']:.1f} img/s, JAX/ORT {rows[-1]['ratio']:.2f}; max |JAX - "
              f"ORT| {diff:.1e}", file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# `fbnet predict` end to end.

def fbnet_command() -> str:
    """The `fbnet` console script of this interpreter's environment."""
    beside = Path(sys.executable).with_name("fbnet")
    found = str(beside) if beside.is_file() else shutil.which("fbnet")
    if not found:
        raise SystemExit(f"no `fbnet` command beside {sys.executable} or on PATH: install the "
                         f"package (pip install -e .) to time fbnet predict")
    return found


def write_faces(folder: Path, faces: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for k, face in enumerate(faces):
        Image.fromarray(face).save(folder / f"face_{k:04d}.png")


def save_checkpoint(workdir: Path, state, config) -> None:
    """A run directory holding the fresh state as the checkpoint of step 0."""
    manager = checkpointing.create_manager(workdir)
    checkpointing.save(manager, 0, state, config=config)
    manager.wait_until_finished()
    manager.close()


# What `fbnet predict` imports before it does anything (jax, flax, orbax, OpenCV, grain), as a
# process of its own: the part of its start-up that is not the network's.
IMPORTS_COMMAND = [sys.executable, "-c", "import fbnet_jax.cli.main, fbnet_jax.serve.predict"]


def run_predict(command: list[str]) -> float:
    """Wall seconds of one `fbnet predict` process (its output discarded unless it fails)."""
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited with {done.returncode}:\n"
                         f"{done.stderr[-3000:]}")
    return seconds


def predict_end_to_end(backbone: str, state, model: InferenceModel, tmp: Path, args) -> dict:
    """Median (min, max) wall seconds of the processes of the end-to-end table, and of restoring
    the checkpoint in this process (`InferenceModel.from_workdir`)."""
    workdir = tmp / f"run_{backbone}"
    save_checkpoint(workdir, state, model.config)
    faces = export.parity_faces(model.image_size, args.predict_images)
    folders = {1: tmp / f"faces_{backbone}_1", args.predict_images: tmp / f"faces_{backbone}_n"}
    write_faces(folders[1], faces[:1])
    write_faces(folders[args.predict_images], faces)
    fbnet = fbnet_command()

    def command(count: int, *flags: str) -> list[str]:
        return [fbnet, "predict", "--workdir", str(workdir), "--out",
                str(tmp / f"preds_{backbone}_{count}.csv"), "--no-detect", *flags,
                str(folders[count])]

    # "1, batch 1": a lone image still runs a whole padded batch (32 by default) through the
    # network, which on a large backbone is most of the run.
    commands = {"imports": IMPORTS_COMMAND, 1: command(1), "1, batch 1": command(
        1, "--batch_size", "1"), args.predict_images: command(args.predict_images)}
    run_predict(command(1))  # warm-up: the page cache, Python's bytecode cache
    walls = {name: [] for name in [*commands, "restore"]}
    for _ in range(args.predict_repeats):
        for name, argv in commands.items():
            walls[name].append(run_predict(argv))
        start = time.perf_counter()
        InferenceModel.from_workdir(workdir)
        walls["restore"].append(time.perf_counter() - start)
    shown = " ".join(command(args.predict_images)).replace(str(tmp), "$TMP")
    print(f"{backbone}: {shown}", file=sys.stderr, flush=True)
    return {name: (statistics.median(w), min(w), max(w)) for name, w in walls.items()}


# --------------------------------------------------------------------------------------------
# Output.

def header() -> str:
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in PACKAGES)
    threads = ort.SessionOptions().intra_op_num_threads
    return (f"{train_throughput.cpu_model()}, {os.cpu_count()} CPUs; {versions}; backend "
            f"{jax.default_backend()}; float32, matmul precision "
            f"{jax.config.jax_default_matmul_precision or 'default'}; ORT intra-op threads "
            f"{threads or 'default (0)'}, XLA_FLAGS {os.environ.get('XLA_FLAGS') or '(unset)'}")


COLUMNS = ("backbone", "size", "batch", "JAX img/s", "ORT img/s", "JAX/ORT (range)",
           "Predictor.predict img/s", "JAX start-up s (lower + compile + 1st call)",
           "ORT start-up s (session + 1st run)", "start-up JAX/ORT")


def table_row(row: dict) -> str:
    rates, jax_s, ort_s = row["rates"], row["startup"]["jax"], row["startup"]["ort"]
    low, high = row["ratio_range"]
    cells = [row["backbone"], str(row["size"]), str(row["batch"]), f"{rates['jax']:.1f}",
             f"{rates['ort']:.1f}", f"{row['ratio']:.2f} ({low:.2f}-{high:.2f})",
             f"{rates['predictor']:.1f}",
             f"{jax_s['total']:.2f} ({jax_s['lower']:.2f} + {jax_s['compile']:.2f} + "
             f"{jax_s['first']:.3f})",
             f"{ort_s['total']:.2f} ({ort_s['session']:.2f} + {ort_s['first']:.3f})",
             f"{jax_s['total'] / ort_s['total']:.1f}"]
    return "| " + " | ".join(cells) + " |"


def predict_table(results: dict, images: int) -> list[str]:
    lines = [f"| backbone | imports alone | restore the checkpoint (in-process) | `fbnet predict`, "
             f"1 image | 1 image, `--batch_size 1` | {images} images | per extra image "
             f"(images/s) |", "|---|---|---|---|---|---|---|"]
    for backbone, walls in results.items():
        cells = [f"{median:.2f} ({low:.2f}-{high:.2f})" if high > low else f"{median:.2f}"
                 for median, low, high in (walls[name] for name in (
                     "imports", "restore", 1, "1, batch 1", images))]
        per_image = (walls[images][0] - walls[1][0]) / (images - 1)
        rate = f"{1 / per_image:.0f}" if per_image > 0 else "n/a: within the noise"
        lines.append(f"| {backbone} | {' | '.join(cells)} | {per_image * 1e3:.1f} ms ({rate}) |")
    return lines


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="small_cnn,vgg_face",
                        help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=7,
                        help="throughput repeats (each times every runtime in turn)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="about how long each runtime is timed in one repeat")
    parser.add_argument("--startup_repeats", type=int, default=3,
                        help="fresh start-ups of each runtime per batch size")
    parser.add_argument("--predict_backbones", default="small_cnn,vgg_face",
                        help="backbones whose `fbnet predict` is timed end to end ('' for none); "
                             "each must be in --backbones")
    parser.add_argument("--predict_images", type=int, default=256,
                        help="images of the larger `fbnet predict` run")
    parser.add_argument("--predict_repeats", type=int, default=3,
                        help="timed `fbnet predict` runs of each size")
    args = parser.parse_args()
    args.backbones = train_throughput.names(args.backbones, list(CONFIGS), "backbones")
    args.predict_backbones = (
        train_throughput.names(args.predict_backbones, args.backbones, "predict_backbones")
        if args.predict_backbones.strip() else [])
    if min(args.repeats, args.startup_repeats, args.predict_repeats) < 1 or args.seconds <= 0 \
            or args.predict_images < 2:
        raise SystemExit("--repeats, --startup_repeats and --predict_repeats must be positive, "
                         "--seconds > 0, --predict_images >= 2")
    return args


def main():
    args = parse_args()
    runtime_defaults.apply()  # the XLA flags, malloc and CPU dispatch `fbnet predict` runs with
    # Fresh compilations only: a persistent cache would turn start-up into a cache read.
    jax.config.update("jax_enable_compilation_cache", False)
    began, load_start = time.perf_counter(), os.getloadavg()
    print(header(), flush=True)
    rows, predicted, notes = [], {}, []
    with tempfile.TemporaryDirectory(prefix="predict_throughput_") as tmp:
        tmp = Path(tmp)
        for backbone in args.backbones:
            state, model = fresh_network(load_config(backbone))
            onnx_path = tmp / f"{backbone}.onnx"
            try:
                report = export.export(model, "onnx", onnx_path)
            except Exception as e:  # pylint: disable=broad-except  # ORT's load errors included
                # One backbone that does not export must not cost the others' rows.
                notes.append(f"{backbone}: the ONNX export failed, no row "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:300]})")
                print(notes[-1], file=sys.stderr, flush=True)
                continue
            notes.append(f"{backbone}: ONNX export {report.export_seconds:.1f} s (jax2onnx; "
                         f"the first of a process includes its set-up) + parity check {report.check_seconds:.1f} s, "
                         f"{report.size_bytes / 1e6:.1f} MB")
            print(notes[-1], file=sys.stderr, flush=True)
            rows += measure(backbone, model, onnx_path, args)
            if backbone in args.predict_backbones:
                predicted[backbone] = predict_end_to_end(backbone, state, model, tmp, args)
            del state, model
    load_end = os.getloadavg()
    print()
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print(table_row(row))
    if predicted:
        print()
        print("\n".join(predict_table(predicted, args.predict_images)))
    print()
    print("\n".join(notes))
    print(f"{time.perf_counter() - began:.0f} s in all; load average (1, 5, 15 min) "
          f"{' '.join(f'{x:.2f}' for x in load_start)} at the start, "
          f"{' '.join(f'{x:.2f}' for x in load_end)} at the end")


if __name__ == "__main__":
    main()
