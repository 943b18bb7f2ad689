"""The `fbnet` command, run as a user runs it (a separate process)."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO


def _fbnet(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "fbnet_jax.main", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), **kwargs)


def test_train_then_eval_from_the_command_line(tmp_path):
    workdir = tmp_path / "run"
    process = _fbnet("train", "--config", "configs/synthetic.py:tiny", "--workdir", str(workdir),
                     "--config.train.num_steps=3", "--config.train.eval_every=0")
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    assert "steps/s" in out and "ex/s" in out and "ETA" in out  # the progress line
    assert "expr acc" in out and "CCC mean" in out              # the final table
    results = json.loads((workdir / "metrics.json").read_text())
    assert results["step"] == 3
    assert json.loads((workdir / "config.json").read_text())["train"]["num_steps"] == 3

    process = _fbnet("eval", "--workdir", str(workdir))
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    again = json.loads((workdir / "eval" / "test_step3.json").read_text())
    assert again["test/expression_accuracy"] == results["test/expression_accuracy"]


def test_unknown_command_and_missing_workdir_are_usage_errors():
    for args in (["fit"], ["eval"]):
        process = _fbnet(*args)
        out, _ = process.communicate(timeout=120)
        assert process.returncode != 0
        assert "usage" in out.lower() or "workdir" in out


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "run"
    process = _fbnet("train", "--config", "configs/synthetic.py:tiny", "--workdir", str(workdir),
                     "--config.train.num_steps=100000", "--config.train.eval_every=0",
                     "--config.train.checkpoint_every=100000", "--config.train.log_every=1")
    lines = []
    deadline = time.time() + 240
    for line in process.stdout:  # wait until training is under way
        lines.append(line)
        if "steps/s" in line or time.time() > deadline:
            break
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    out = "".join(lines) + out
    assert process.returncode == 0, out
    assert "SIGTERM" in out
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and 0 < steps[-1] < 100000
    assert not (workdir / "metrics.json").exists()
