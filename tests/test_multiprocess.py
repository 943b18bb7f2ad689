"""Multi-process runs: real `fbnet train` processes on localhost (gloo collectives, fake CPU
devices) give the numbers of one process with as many devices, resume on another number of
processes, and stop together when one of them is signalled."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import portpicker
import pytest

from conftest import REPO
from fbnet_jax.runtime import checkpointing

FLAGS = ["--config", "synthetic:tiny", "--config.train.num_steps=6",
         "--config.train.log_every=1", "--config.evals.validation.every=3",
         "--config.train.checkpoint_every=2"]
STEP_LINE = re.compile(r"step +(\d+)/\d+ .*\| loss ([\d.]+) \| (.*) \| lr")


def _start(workdir, num_processes, devices_per_process, extra=()):
    """Starts the processes of one run; returns the Popen objects."""
    port = portpicker.pick_unused_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    processes = []
    for i in range(num_processes):
        command = [sys.executable, "-m", "fbnet_jax", "train", "--workdir", str(workdir),
                   *FLAGS, *extra]
        if num_processes > 1:
            command += ["--coordinator_address", f"127.0.0.1:{port}",
                        "--num_processes", str(num_processes), "--process_id", str(i)]
        # stderr goes to a file, so no process blocks on a full pipe while another is awaited.
        err = tempfile.TemporaryFile("w+")  # pylint: disable=consider-using-with
        process = subprocess.Popen(command, env=env, cwd=REPO, text=True,
                                   stdout=subprocess.DEVNULL, stderr=err)
        process.err_file = err
        processes.append(process)
    return processes


def _stderr(process):
    process.err_file.seek(0)
    text = process.err_file.read()
    process.err_file.close()
    return text


def _finish(processes, timeout=240):
    """Waits for every process; returns [(status, stderr)]. Processes still running after
    `timeout` seconds are killed, and the error shows the end of every process's stderr."""
    deadline = time.monotonic() + timeout
    hung = []
    for i, process in enumerate(processes):
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            hung.append(i)
    for process in processes:
        process.kill()
    for process in processes:
        process.wait()
    results = [(process.returncode, _stderr(process)) for process in processes]
    if hung:
        tails = "\n".join(f"--- process {i} (status {status}):\n{err[-2000:]}"
                           for i, (status, err) in enumerate(results))
        raise AssertionError(f"process(es) {hung} still running after {timeout}s:\n{tails}")
    return results


def _run(workdir, num_processes, devices_per_process, extra=()):
    return _finish(_start(workdir, num_processes, devices_per_process, extra))


def _losses(workdir):
    """{step: (total loss, the terms)} from the run's train.log (written by process 0)."""
    text = (workdir / "train.log").read_text()
    return {int(m[1]): (float(m[2]), m[3]) for m in STEP_LINE.finditer(text)}


def _assert_close_metrics(a, b):
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process with 4 devices."""
    workdir = tmp_path_factory.mktemp("one_process")
    [(status, err)] = _run(workdir, 1, 4)
    assert status == 0, err[-3000:]
    return workdir


def test_two_processes_train_like_one_process_with_as_many_devices(one_process, tmp_path):
    results = _run(tmp_path, 2, 2)
    assert [status for status, _ in results] == [0, 0], results[0][1][-3000:]
    assert "process 0 of 2 joined the coordinator at 127.0.0.1:" in results[0][1]
    assert "step: jax.jit over 4 device(s)" in results[0][1]
    # Process 1 reports nothing (process 0 logs, writes TensorBoard, metrics and config).
    assert "step 1/6" not in results[1][1] and "final evaluation" not in results[1][1]
    expected, got = _losses(one_process), _losses(tmp_path)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step, (loss, terms) in expected.items():
        assert got[step][0] == pytest.approx(loss, abs=2e-4), step
        assert got[step][1] == terms or step > 1, step
    _assert_close_metrics(json.loads((one_process / "metrics.json").read_text()),
                          json.loads((tmp_path / "metrics.json").read_text()))


def test_a_run_started_on_two_processes_continues_on_one(one_process, tmp_path):
    results = _run(tmp_path, 2, 2, ["--config.train.stop_after_steps=3"])
    assert [status for status, _ in results] == [75, 75], results[0][1][-3000:]
    assert checkpointing.saved_steps(tmp_path) == [2, 3]
    [(status, err)] = _run(tmp_path, 1, 4)
    assert status == 0, err[-3000:]
    assert "resumed from the checkpoint of step 3" in err
    expected, got = _losses(one_process), _losses(tmp_path)
    for step in (4, 5, 6):  # the steps made by the single process, on the same global batches
        assert got[step][0] == pytest.approx(expected[step][0], abs=2e-4), step
    _assert_close_metrics(json.loads((one_process / "metrics.json").read_text()),
                          json.loads((tmp_path / "metrics.json").read_text()))


def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    processes = _start(tmp_path, 2, 2, ["--config.train.num_steps=3000",
                                         "--config.train.checkpoint_every=3000",
                                         "--config.train.log_every=100",
                                         "--config.evals.validation.every=0"])
    log_file = tmp_path / "train.log"
    deadline = time.monotonic() + 180
    while not (log_file.exists() and "first step (compilation included)" in log_file.read_text()):
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            raise AssertionError(f"the run ended or hung before its first step: "
                                 f"{_finish(processes)}")
        time.sleep(0.2)
    processes[1].send_signal(signal.SIGTERM)
    results = _finish(processes)
    assert [status for status, _ in results] == [75, 75], results[0][1][-3000:]
    [step] = checkpointing.saved_steps(tmp_path)
    # Agreed where a step is logged: between two, no process waits for the others.
    assert 100 <= step < 3000 and step % 100 == 0
    assert (f"stopped at step {step} of 3000 (a stop on another process); checkpoint saved"
            in log_file.read_text())
    assert "WARNING: SIGTERM received: saving a checkpoint and stopping" in results[1][1]
