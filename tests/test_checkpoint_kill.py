"""A run killed inside a checkpoint save keeps the checkpoint before it, and resumes from it.

Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` once every
item is written (fbnet_jax/runtime/checkpointing.py). A child process trains the tiny config with
checkpoints at steps 2, 4 and 6 and SIGKILLs itself inside the save of step 4, at a point that
the save itself reaches, so there is no timer and no race: just before the rename that commits the
step (every item written), or while the `config` item is being written. The run must then still
be at step 2, and a restart must clean the half-written step away, say that it resumed from step
2, and end with exactly the numbers of a run that was never interrupted, in metrics.json and in
the records of metrics.jsonl. The restart uses the same config, or (second case) another
checkpoint cadence, which a restart may change.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, load_config
from fbnet_jax.runtime import checkpointing, parallel
from fbnet_jax.eval import metrics_log
from fbnet_jax.train import loop as train
from fbnet_jax.runtime import state as state_lib

# Checkpoints at 2, 4 and 6; dropout makes the restored rng matter too.
OVERRIDES = {"train.num_steps": 6, "train.checkpoint_every": 2, "evals.validation.every": 0,
             "train.best_metric": "", "model.backbones.small_cnn.dropout": 0.2}
KILLED_STEP = 4
TMP_MARK = ".orbax-checkpoint-tmp"

# The child wraps the orbax function that runs at the chosen point of a save; the wrapper kills
# the process when it runs for step KILLED_STEP and otherwise only calls the original. stdout gets
# one line, naming the temporary directory the save was writing.
_KILLED_RUN = r"""
import json, os, signal, sys
from pathlib import Path
from orbax.checkpoint._src.handlers import json_checkpoint_handler
from orbax.checkpoint._src.path import atomicity
sys.path.insert(0, "tests")
from conftest import load_config
from fbnet_jax.train import loop as train

workdir, overrides, step, where = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]


def kill(step_dir):
    print(f"killed at {where} of {Path(step_dir).name}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if where == "commit":  # every item is written; the rename to the final name is next
    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def kill_before_rename(self):
        if self.get_final().name == step:
            kill(self.get())
        return await commit(self)

    atomicity.AtomicRenameTemporaryPath.finalize = kill_before_rename
elif where == "config_write":
    write_json = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def kill_in_write(self, item, directory):
        step_dir = Path(directory).parent  # `directory` is <step dir>/config
        if step_dir.name.startswith(step + ".orbax-checkpoint-tmp"):
            kill(step_dir)
        return await write_json(self, item, directory)

    json_checkpoint_handler.JsonCheckpointHandler._save_fn = kill_in_write
else:
    raise ValueError(f"unknown kill point {where!r}")

config = load_config("synthetic.py", "tiny")
config.update_from_flattened_dict(overrides)
train.train_and_evaluate(config, workdir)
print("finished without being killed")
"""


def _config():
    config = load_config("synthetic.py", "tiny")
    config.update_from_flattened_dict(OVERRIDES)
    return config


def _latest_params(workdir, config):
    """The parameters of the run's latest checkpoint, and its step."""
    _, _, _, abstract = state_lib.create_state(config, parallel.create_mesh(), abstract=True)
    manager = checkpointing.create_manager(workdir, read_only=True)
    try:
        state, step = checkpointing.restore(manager, abstract)
    finally:
        manager.close()
    return state.params, step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Final metrics, parameters and records of the same run, never interrupted."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    config = _config()
    metrics = train.train_and_evaluate(config, workdir)
    params, step = _latest_params(workdir, config)
    assert step == OVERRIDES["train.num_steps"]
    return metrics, params, metrics_log.read(workdir)[0]


def _kill_inside_save(workdir, where: str) -> str:
    """Runs the child until it kills itself at `where` in the save of KILLED_STEP; its stdout."""
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, str(workdir), json.dumps(OVERRIDES), str(KILLED_STEP),
         where], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
        text=True, timeout=240, check=False)
    assert child.returncode == -signal.SIGKILL, (
        f"the child was not killed (status {child.returncode}); stdout {child.stdout!r}; "
        f"stderr:\n{child.stderr[-4000:]}")
    return child.stdout


def _untimed(records) -> dict:
    """{(kind, step): values} of the records but "start", without the rates (timing varies)."""
    return {(r.kind, r.step): {k: v for k, v in r.values.items()
                               if k not in ("steps_per_second", "examples_per_second")}
            for r in records if r.kind != "start"}


def _last_invocation(log_text: str) -> str:
    """What train.log got from its latest invocation (each starts with `work directory:`)."""
    return log_text[log_text.rindex("work directory:"):]


@pytest.mark.parametrize("where, restart_every", [
    ("commit", 2),
    # A restart may change train.checkpoint_every. At 3 nothing saves step 4 again (a save of it
    # would replace its temporary directory), so only the clean-up that the restart's checkpoint
    # manager does before its first save removes the half-written step.
    pytest.param("config_write", 3, marks=pytest.mark.slow)])
def test_a_kill_inside_a_save_keeps_the_previous_checkpoint_and_resumes_exactly(
        where, restart_every, uninterrupted, tmp_path):
    workdir = tmp_path / "killed"
    checkpoints = checkpointing.checkpoint_dir(workdir)
    stdout = _kill_inside_save(workdir, where)
    assert stdout.startswith(f"killed at {where} of {KILLED_STEP}{TMP_MARK}"), stdout

    # Killed inside the save: the step is only a temporary directory, which orbax does not list.
    started = [p for p in checkpoints.iterdir() if p.name.startswith(f"{KILLED_STEP}.")]
    assert len(started) == 1 and TMP_MARK in started[0].name, started
    assert not (checkpoints / str(KILLED_STEP)).exists()
    if where == "commit":  # every item was written: only the rename was missing
        assert {"state", "config"} <= {p.name for p in started[0].iterdir()}
    assert checkpointing.saved_steps(workdir) == [2]
    assert not (workdir / "metrics.json").exists()
    # Every record written before the kill is there: step 4's (logged before its save), and
    # step 6's when the loop got there before the save's background thread reached the kill.
    killed = [(r.kind, r.step) for r in metrics_log.read(workdir)[0]]
    assert killed[:3] == [("start", 0), ("train", 2), ("train", 4)]
    assert killed[3:] in ([], [("train", 6)])

    config = _config()
    config.train.checkpoint_every = restart_every
    metrics = train.train_and_evaluate(config, workdir)
    assert "resumed from the checkpoint of step 2\n" in _last_invocation(
        (workdir / "train.log").read_text())
    assert [p.name for p in checkpoints.iterdir() if TMP_MARK in p.name] == []
    # The restart's last two saves (train.max_checkpoints_to_keep = 2): 4 and 6, or 3 and 6.
    assert checkpointing.saved_steps(workdir) == [6 - restart_every, 6]

    expected_metrics, expected_params, expected_records = uninterrupted
    assert metrics == expected_metrics  # the resume is bit-identical, so no tolerance
    # The killed invocation's records after step 2 are gone from the file; the restart's replace
    # them: a logged step every 2 steps and at each of its checkpoints.
    lines = (workdir / metrics_log.FILE).read_text().splitlines()
    records = [metrics_log.Record.from_line(line) for line in lines]
    assert [(r.kind, r.step) for r in records] == [
        ("start", 0), ("train", 2), ("start", 2),
        *(("train", s) for s in range(3, 7) if s % 2 == 0 or s % restart_every == 0),
        ("final", 6)]
    assert metrics_log.read(workdir)[0] == records
    # Means over the same steps are the same numbers (all but the rates): every record at the
    # same checkpoint cadence; at another, step 2's and the final evaluation.
    got, expected = _untimed(records), _untimed(expected_records)
    same = expected if restart_every == 2 else [("train", 2), ("final", 6)]
    assert {key: got[key] for key in same} == {key: expected[key] for key in same}
    params, step = _latest_params(workdir, config)
    assert step == OVERRIDES["train.num_steps"]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree.leaves(expected_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                      err_msg=jax.tree_util.keystr(path))
