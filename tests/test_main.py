"""The `fbnet` command, run as a user runs it (a separate process)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO


def _fbnet(*args, env_extra=None, new_session=False):
    env = {k: v for k, v in os.environ.items() if k != "FBNET_DEBUG"}
    env.update(PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "fbnet_jax", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=new_session)


def test_train_then_eval_from_the_command_line(tmp_path):
    workdir = tmp_path / "run"
    faces = tmp_path / "faces"   # the render cache, rendered by two spawned processes
    process = _fbnet("train", "--config", "configs/synthetic.py:tiny", "--workdir", str(workdir),
                     "--config.train.num_steps=3", "--config.evals.validation.every=0",
                     f"--config.data.render_cache_dir={faces}",
                     "--config.data.render_processes=2",
                     "--config.data.sources.affwild2_like.synthetic.num_records=4000")
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    # 3 sources x (train 400 or 4000, validation 16, test 24) faces of 32 x 32 x 3 bytes.
    assert re.search(rf"render cache {faces}: 0 of 9 sets already there; rendered 9 "
                     r"\(4920 faces, 15 MB\) in [\d.]+ s with 2 process\(es\)", out), out
    assert len(list(faces.glob("*/images.npy"))) == 9
    assert "steps/s" in out and "ex/s" in out and "ETA" in out  # the progress line
    assert "expr acc" in out and "CCC mean" in out              # the final table
    results = json.loads((workdir / "metrics.json").read_text())
    assert results["step"] == 3
    assert json.loads((workdir / "config.json").read_text())["train"]["num_steps"] == 3

    process = _fbnet("eval", "--workdir", str(workdir))
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    assert "render cache" not in out   # the run's faces, read from its cache folder
    again = json.loads((workdir / "eval" / "test_step3.json").read_text())
    assert again["test/expression_accuracy"] == results["test/expression_accuracy"]
    # Each evaluation leaves a report beside its metrics; the final one in <workdir>/report.
    for folder in (workdir / "report", workdir / "eval" / "test_step3"):
        assert {"report.md", "report.html", "confusion_matrix.png"} <= {
            f.name for f in folder.iterdir()}, folder

    process = _fbnet("compare", str(workdir), str(workdir), "--out", str(tmp_path / "c.md"))
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    assert "expression_accuracy" in (tmp_path / "c.md").read_text()

    # The trained network leaves the run: exported, and predicting on files.
    process = _fbnet("export", "--workdir", str(workdir), "--format", "stablehlo", "--out",
                     str(tmp_path / "model.stablehlo"))
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    assert "parity with the JAX model on synthetic faces" in out
    assert (tmp_path / "model.stablehlo").stat().st_size > 0
    from PIL import Image  # pylint: disable=g-import-not-at-top
    Image.new("RGB", (40, 40), (120, 90, 60)).save(tmp_path / "face.png")
    process = _fbnet("predict", "--workdir", str(workdir), "--out", str(tmp_path / "p.jsonl"),
                     "--no-detect", str(tmp_path / "face.png"))
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    [row] = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert (row["file"], row["face"], row["status"]) == (str(tmp_path / "face.png"), 0, "ok")


def _until(process, text, lines, timeout=240):
    """Reads the process's output into `lines` until a line contains `text`."""
    deadline = time.time() + timeout
    for line in process.stdout:
        lines.append(line)
        if text in line or time.time() > deadline:
            return


def _long_run(workdir):
    return _fbnet("train", "--config", "configs/synthetic.py:tiny", "--workdir", str(workdir),
                  "--config.train.num_steps=100000", "--config.evals.validation.every=0",
                  "--config.train.checkpoint_every=100000", "--config.train.log_every=1")


def _checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_checkpoint_and_exit_as_stopped(tmp_path, signum):
    workdir = tmp_path / "run"
    process = _long_run(workdir)
    lines = []
    _until(process, "steps/s", lines)  # training is under way
    process.send_signal(signum)
    out, _ = process.communicate(timeout=120)
    out = "".join(lines) + out
    assert process.returncode == 75, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    name = signal.Signals(signum).name
    steps = _checkpoint_steps(workdir)
    assert steps and 0 < steps[-1] < 100000
    assert out.rstrip().splitlines()[-1].endswith(
        f"stopped at step {steps[-1]} of 100000 ({name}); checkpoint saved; run the same command "
        f"again (same --workdir {workdir}) to continue")
    assert not (workdir / "metrics.json").exists()
    # Every console line is in train.log too, with dates (lines of multi-line messages, such as
    # the parameter table, carry no time stamp in either).
    log_text = (workdir / "train.log").read_text()
    console_text = "\n".join(line for line in out.splitlines() if not line.startswith("fbnet:"))
    assert re.sub(r"(?m)^\d{4}-\d\d-\d\d ", "", log_text).strip() == console_text.strip()
    assert f"WARNING: {name} received" in out


def test_ctrl_c_in_a_terminal_stops_cleanly_with_worker_processes(tmp_path):
    # A terminal sends SIGINT to the whole process group, grain's workers included.
    workdir = tmp_path / "run"
    process = _fbnet("train", "--config", "configs/synthetic.py:tiny", "--workdir", str(workdir),
                     "--config.train.num_steps=100000", "--config.evals.validation.every=0",
                     "--config.train.log_every=1", "--config.data.num_workers=2",
                     new_session=True)
    lines = []
    _until(process, "steps/s", lines)
    os.killpg(process.pid, signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    out = "".join(lines) + out
    assert process.returncode == 75, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert "(SIGINT); checkpoint saved" in out
    # The batches still held when the loop ended were freed before the exit, their shared
    # memory with them (else Python's resource tracker warns of it at exit).
    assert "leaked shared_memory" not in out, out


def test_stop_after_steps_is_not_success(tmp_path):
    workdir = tmp_path / "run"
    process = _fbnet("train", "--config", "configs/synthetic.py:tiny", "--workdir", str(workdir),
                     "--config.train.stop_after_steps=2", "--config.evals.validation.every=0")
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 75, out
    assert out.rstrip().splitlines()[-1].endswith(
        "stopped at step 2 of 4 (train.stop_after_steps); checkpoint saved; run the same command "
        f"again (same --workdir {workdir}) to continue")
    assert _checkpoint_steps(workdir) == [2] and not (workdir / "metrics.json").exists()


# (arguments, the error line's text after "fbnet: error: ")
USER_ERRORS = [
    (["train", "--config", "configs/synthetic.py:tiny", "--config.train.num_step=3"],
     "--config.train.num_step: the config has no field 'train.num_step'; did you mean "
     "train.num_steps?"),
    (["train", "--config", "nothere.py"],
     "--config nothere.py: no such file, and not a config shipped with fbnet_jax (those are: "
     "ablation.py, paper_vgg.py, synthetic.py)"),
    (["train", "--config", "synthetic:tiny", "--config.data.sources.affwild2_like.synthetic."
      "label_aus=(1,)"],
     "Type <class 'NoneType'> of field config.data.sources.affwild2_like.synthetic.label_aus is "
     "not supported for overriding."),
    (["train", "--config", "synthetic:huge"],
     "--config synthetic:huge: ValueError: unknown variant 'huge' of configs/synthetic.py; use "
     "'' or 'tiny'"),
    (["train", "--nope"], "Unknown command line flag 'nope'"),
    (["train", "--config.train.num_steps=abc"],
     "flag --config.train.num_steps=abc: invalid literal for int() with base 10: 'abc'"),
    (["train", "--config", "synthetic:tiny", "--step", "3"], "--step: not a flag of fbnet train"),
    (["fit"], "usage: fbnet {train|eval|relatedness|prepare|export|predict|convert-weights|"
              "compare} "
              "[flags] (got 'fit'); see fbnet --help"),
    ([], "usage: fbnet {train|eval|relatedness|prepare|export|predict|convert-weights|compare} "
         "[flags]; "
         "see fbnet --help"),
    (["export", "--format", "onnx", "--out", "m.onnx"],
     "fbnet export needs --workdir (or --checkpoint)"),
    (["export", "--workdir", "WORKDIR", "--checkpoint", "WORKDIR", "--format", "onnx", "--out",
      "m.onnx"], "fbnet export takes --workdir (with --step) or --checkpoint, not both"),
    (["export", "--workdir", "WORKDIR", "--config", "synthetic", "--format", "onnx"],
     "fbnet export takes no --config; its flags are --workdir, --step, --checkpoint, --format, "
     "--out"),
    (["predict", "--workdir", "WORKDIR", "--out", "p.csv"],
     "fbnet predict needs images, folders or videos to predict on: fbnet predict --workdir DIR "
     "--out preds.csv PATH..."),
    (["predict", "--workdir", "WORKDIR", "--out", "p.csv", "--split", "test", "a.jpg"],
     "--split: not a flag of fbnet predict"),
    (["convert-weights", "--out", "w.npz"], "fbnet convert-weights needs --from"),
    (["train", "--out", "x"], "--out: not a flag of fbnet train"),
    (["relatedness", "--out", "t.json", "--process_id", "0"],
     "--process_id: not a flag of fbnet relatedness"),
    (["train", "--config", "synthetic:tiny", "--process_id", "1"],
     "--coordinator_address, --num_processes missing: a multi-process run needs "
     "--coordinator_address, --num_processes and --process_id"),
    (["train", "--config", "synthetic:tiny", "--coordinator_address", "h:1", "--num_processes",
      "2", "--process_id", "2"], "--process_id 2 is not in 0..1 (--num_processes 2)"),
    (["eval"], "fbnet eval takes --workdir DIR (with --step N to pick a checkpoint) or "
               "--checkpoint PATH, one of the two"),
    (["eval", "--workdir", "/nonexistent/run"], "--workdir /nonexistent/run: no such directory"),
    (["prepare", "--dataset", "rafdb", "--data_dir", "WORKDIR"],
     "fbnet prepare needs --manual_dir"),
    (["prepare", "--dataset", "rafdb", "--manual_dir", "WORKDIR", "--data_dir", "WORKDIR",
      "--option", "image=original"],
     "rafdb: unknown option(s) image; its options: images (default 'aligned'), validation_fraction "
     "(default 0.1), seed (default 0), margin (default 0.2), image_size (default 0)"),
    (["prepare", "--dataset", "rafdb", "--manual_dir", "WORKDIR", "--data_dir", "WORKDIR/out"],
     "rafdb: found no RAF-DB basic label file under WORKDIR; looked for "
     "WORKDIR/basic/EmoLabel/list_patition_label.txt, "
     "WORKDIR/basic/EmoLabel/list_partition_label.txt, "
     "WORKDIR/EmoLabel/list_patition_label.txt, WORKDIR/EmoLabel/list_partition_label.txt "
     "(also one and two folders down)"),
    (["train", "--config", "paper_vgg:rafdb", "--config.data.sources.rafdb.root=/no/such",
      "--config.model.init_from=none"],
     "invalid config: data.sources.rafdb.root: /no/such does not exist"),
    (["eval", "--workdir", "WORKDIR", "--config", "synthetic"],
     "WORKDIR/checkpoints: no checkpoint to evaluate; is WORKDIR the work directory of a run "
     "that saved one?"),
    (["eval", "--checkpoint", "WORKDIR"], "--checkpoint WORKDIR: not a checkpoint directory (its "
                                          "name is the step, e.g. <workdir>/checkpoints/400)"),
]


@pytest.mark.parametrize("args, message", USER_ERRORS, ids=[" ".join(a) for a, _ in USER_ERRORS])
def test_user_mistakes_are_one_line(tmp_path, args, message):
    args = [a.replace("WORKDIR", str(tmp_path)) for a in args]
    (tmp_path / "a_file").write_text("")  # a manual_dir that is not empty
    process = _fbnet(*args)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 2, out
    assert out.strip().splitlines() == [f"fbnet: error: {message.replace('WORKDIR', str(tmp_path))}"]


def test_a_config_mistake_fails_before_anything_is_written(tmp_path):
    workdir = tmp_path / "run"
    process = _fbnet("train", "--config", "synthetic:tiny", "--workdir", str(workdir),
                     "--config.evals.test.split=tset", "--config.model.backbone=resnet")
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 2, out
    assert out.strip().splitlines() == [
        "fbnet: error: invalid config:",
        "  - model.backbone: unknown backbone 'resnet'; known: small_cnn, vgg_face, resnet50",
        "  - evals.test.split: 'tset' is not a split of affectnet_like, affwild2_like, rafdb_like "
        "(splits of every source it reads: test, validation)"]
    assert not workdir.exists()


def test_debug_shows_the_traceback(tmp_path):
    for args, env in ((["--debug"], {}), ([], {"FBNET_DEBUG": "1"})):
        process = _fbnet("train", "--config", "synthetic:tiny", "--config.train.num_steps=0",
                         "--workdir", str(tmp_path / "run"), *args, env_extra=env)
        out, _ = process.communicate(timeout=120)
        assert process.returncode != 0
        assert "Traceback" in out and "ConfigError" in out


def test_an_unwritable_workdir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    process = _fbnet("train", "--config", "synthetic:tiny", "--workdir", str(blocker / "run"))
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 2, out
    assert out.strip().splitlines()[-1] == (
        f"fbnet: error: cannot create the work directory {blocker / 'run'}: Not a directory")


def test_restarts_and_eval_of_a_run(tmp_path):
    workdir = tmp_path / "run"
    train_args = ["train", "--config", "synthetic:tiny", "--workdir", str(workdir)]
    out, _ = _fbnet(*train_args).communicate(timeout=300)
    config_json = (workdir / "config.json").read_bytes()

    # A shape change fails in a few lines naming the field, and leaves the run as it was.
    process = _fbnet(*train_args, "--config.data.image_size=48")
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 3 and "changed by data.image_size: 32 -> 48" in lines[1], out
    assert (workdir / "config.json").read_bytes() == config_json

    # A finished run says so and is not evaluated again.
    process = _fbnet(*train_args, "--config.train.log_every=1")
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out
    assert "changed (no effect on the training): train.log_every: 2 -> 1" in out
    assert "the run is complete (step 4 of 4)" in out and "first step" not in out

    # eval: the checkpoint's config; no orbax chatter; overrides of evaluation settings apply.
    process = _fbnet("eval", "--workdir", str(workdir), "--config.data.eval_batch_size=8")
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    assert "evaluating with data.eval_batch_size: 32 -> 8" in out
    assert "INFO" not in out and "WARNING" not in out and "orbax" not in out.lower()
    tuned = "AU mean F1 at per-AU thresholds tuned on 'validation'"
    assert tuned in out
    final = json.loads((workdir / "metrics.json").read_text())
    again = json.loads((workdir / "eval" / "test_step4.json").read_text())
    assert again["test/expression_accuracy"] == final["test/expression_accuracy"]
    assert again["test/au_tuned_mean_f1"] == final["test/au_tuned_mean_f1"]

    # Scoring the thresholds' own split reports no tuned metrics.
    process = _fbnet("eval", "--workdir", str(workdir), "--split", "validation")
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    assert tuned not in out and "the split being scored" in out
    assert "validation/au_tuned_mean_f1" not in json.loads(
        (workdir / "eval" / "validation_step4.json").read_text())

    # A checkpoint directory on its own, one evaluator by name: a partial result of its own name.
    process = _fbnet("eval", "--checkpoint", str(workdir / "checkpoints" / "4"), "--evals",
                     "validation")
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    partial = json.loads((workdir / "eval" / "validation@validation_step4.json").read_text())
    assert partial == json.loads((workdir / "eval" / "validation_step4.json").read_text())

    for args, message in (
            (["--step", "3"], f"--step 3: the run in {workdir} has no checkpoint of that step; it "
                              f"has 2, 4"),
            (["--split", "nonsense"], "--split 'nonsense' is not a split of the sources of test "
                                      "(they have: test, train, validation)"),
            (["--evals", "test,vlidation"], "--evals: no evaluator named 'vlidation'; "
                                            "config.evals has test, validation"),
            (["--config.data.image_size=40"], "this config does not fit the checkpoint: the train "
                                              "state in the checkpoint of step 4 has other shapes"),
            (["--config", "synthetic"], "this config does not fit the checkpoint: the train "
                                        "state in the checkpoint of step 4 has other shapes")):
        process = _fbnet("eval", "--workdir", str(workdir), *args)
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 2, out
        assert out.strip().splitlines()[0].startswith(f"fbnet: error: {message}"), out


def test_relatedness_command_writes_a_table_and_refuses_mistakes_in_one_line(tmp_path):
    from fbnet_jax.core import relatedness as tables  # pylint: disable=g-import-not-at-top
    from fbnet_jax.core import taxonomy  # pylint: disable=g-import-not-at-top
    table = tmp_path / "table.json"
    tiny = ["relatedness", "--config", "configs/synthetic.py:tiny"]
    process = _fbnet(*tiny, "--out", str(table), "--max_examples", "200")
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out
    assert "\nAU               1    2    4    5    6 " in out and "\nSurprise  est " in out, out
    estimated = sum(n >= 20 for row in json.loads(table.read_text())["counts"] for n in row)
    assert out.rstrip().splitlines()[-1].endswith(
        f"wrote {table} ({estimated} of 119 entries estimated); train with it: "
        f"--config.loss.relatedness={table}")
    loaded = tables.load(str(table), taxonomy.AUS)
    assert loaded.source.startswith(
        f"{table}: P(AU active | expression) counted on the training split of config "
        f"'synthetic_tiny': affwild2_like (200 examples), at most 200 per source")

    for args, message in (
            ([*tiny, "--out", str(table),
              "--config.data.sources.affwild2_like.synthetic.label_expression=false"],
             "no training source labels an expression and AUs on the same examples, so there is "
             "nothing to estimate P(AU | expression) from: affectnet_like labels expressions and "
             "no AU; affwild2_like labels AUs and no expression; rafdb_like labels expressions "
             "and no AU"),
            (tiny, "fbnet relatedness needs --out FILE (the JSON table to write)"),
            ([*tiny, "--out", str(table), "--step", "3"],
             "--step: not a flag of fbnet relatedness"),
            (["train", "--out", str(table)], "--out: not a flag of fbnet train")):
        process = _fbnet(*args)
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 2, out
        assert out.strip().splitlines() == [f"fbnet: error: {message}"]
