"""Training: one step, a whole tiny run with its artefacts, resume, divergence, devices."""

import json
import logging
import math
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, first_batch
from data_pipelines import pipeline
from fbnet_jax.runtime import checkpointing, parallel
from fbnet_jax.eval import evaluate
from fbnet_jax.train import loop as train, progress, signals
from fbnet_jax.train.step import coupling_for, make_train_step
from fbnet_jax.core.errors import ConfigError
from fbnet_jax.runtime import state as state_lib




def test_one_train_step_changes_params_and_reports_losses(tiny_config):
    tiny_config.optimizer.warmup_steps = 0  # the warm-up starts at learning rate 0
    mesh = parallel.create_mesh()
    model, tx, _, state = state_lib.create_state(tiny_config, mesh)
    step_fn = jax.jit(make_train_step(model, tx, tiny_config.loss.weights))
    batch = parallel.global_batch(first_batch(tiny_config), mesh)
    new_state, step_means = step_fn(state, batch)
    metrics = step_means.compute()
    assert int(new_state.step) == 1 and int(step_means.skipped) == 0
    assert set(metrics) == {"loss/expression", "loss/au", "loss/va", "loss/total", "grad_norm"}
    assert all(math.isfinite(float(v)) for v in metrics.values())
    # The tiny mixture labels every task, so every task loss is positive at initialisation.
    assert all(float(metrics[k]) > 0 for k in ("loss/expression", "loss/au", "loss/va"))
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                           state.params, new_state.params)
    assert all(jax.tree.leaves(changed))
    # BatchNorm statistics are updated by the step too.
    assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)),
                                            state.batch_stats, new_state.batch_stats)))


def test_tiny_run_leaves_artefacts_and_eval_reproduces_them(tiny_config, tmp_path):
    results = train.train_and_evaluate(tiny_config, tmp_path)
    for key in ("test/expression_accuracy", "test/au_mean_f1", "test/va_mean_ccc",
                "test/au_tuned_mean_f1", "test/au_threshold/AU12"):
        assert key in results and math.isfinite(results[key])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(results)
    assert checkpointing.load_config(tmp_path).train.num_steps == tiny_config.train.num_steps
    manager = checkpointing.create_manager(tmp_path, read_only=True)
    assert manager.latest_step() == tiny_config.train.num_steps
    manager.close()
    # TensorBoard event files hold the training losses and the evaluations.
    from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/total", "steps_per_second", "test/expression_accuracy",
            "validation/expression_accuracy", "data/fraction/rafdb_like"} <= tags
    fractions = [events.Scalars(f"data/fraction/{name}")[-1].value
                 for name in pipeline.source_names(tiny_config.data)]
    assert sum(fractions) == pytest.approx(1.0)
    # `fbnet eval` re-evaluates the latest checkpoint: the same numbers as the run's own.
    again = evaluate.evaluate_workdir(tmp_path)
    assert again == pytest.approx(results)
    assert (tmp_path / "eval" / f"test_step{tiny_config.train.num_steps}.json").exists()


def _restored_params(workdir, config):
    mesh = parallel.create_mesh()
    _, _, _, abstract = state_lib.create_state(config, mesh, abstract=True)
    manager = checkpointing.create_manager(workdir, read_only=True)
    state, step = checkpointing.restore(manager, abstract)
    manager.close()
    return state, step


def test_resume_continues_exactly(tiny_config, tmp_path):
    # A mixture with augmentation, dropout and shuffling: everything random must be restored.
    tiny_config.train.num_steps = 6
    tiny_config.evals.validation.every = 0
    tiny_config.train.checkpoint_every = 100
    tiny_config.model.backbones.small_cnn.dropout = 0.2
    train.train_and_evaluate(tiny_config, tmp_path / "straight")

    tiny_config.train.stop_after_steps = 3
    with pytest.raises(train.TrainingStopped) as stopped:
        train.train_and_evaluate(tiny_config, tmp_path / "resumed")
    assert (stopped.value.step, stopped.value.reason) == (3, "train.stop_after_steps")
    _, step = _restored_params(tmp_path / "resumed", tiny_config)
    assert step == 3
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    train.train_and_evaluate(tiny_config, tmp_path / "resumed")  # 3 more steps, then finishes

    straight, step_a = _restored_params(tmp_path / "straight", tiny_config)
    resumed, step_b = _restored_params(tmp_path / "resumed", tiny_config)
    assert step_a == step_b == 6
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _sgd(config, learning_rate):
    config.optimizer.name = "sgd"
    config.optimizer.grad_clip_norm = 0.0
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.optimizer.learning_rate = learning_rate


DIVERGING = 1e39  # inf in float32: the first update makes the state non-finite


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_diverged_state_is_never_checkpointed(tiny_config, tmp_path):
    # The loss of step 1 is computed at the initial parameters and is finite; the parameters
    # that step 1 produces are not. That state must not become the "last good" checkpoint.
    tiny_config.train.num_steps = 8
    tiny_config.evals.validation.every = 0
    tiny_config.train.checkpoint_every = 1
    tiny_config.train.log_every = 100
    _sgd(tiny_config, DIVERGING)
    with pytest.raises(FloatingPointError, match=r"refusing to checkpoint step 1: the train state "
                                                 r"holds NaN or infinite values in .*params/"):
        train.train_and_evaluate(tiny_config, tmp_path)
    assert checkpointing.saved_steps(tmp_path) == []
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_divergence_after_a_restart_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
    tiny_config.train.num_steps = 8
    tiny_config.evals.validation.every = 0
    tiny_config.train.checkpoint_every = 2
    tiny_config.train.stop_after_steps = 2
    _sgd(tiny_config, 1e-2)
    with pytest.raises(train.TrainingStopped):
        train.train_and_evaluate(tiny_config, tmp_path)
    tiny_config.optimizer.learning_rate = DIVERGING
    with pytest.raises(FloatingPointError, match=r"the last good checkpoint \(step 2\) is kept"):
        train.train_and_evaluate(tiny_config, tmp_path, allow_config_change=True)
    assert checkpointing.saved_steps(tmp_path) == [2]
    state, step = _restored_params(tmp_path, tiny_config)
    assert step == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
    log_text = (tmp_path / "train.log").read_text()
    error_lines = [line for line in log_text.splitlines() if "ERROR: FloatingPointError" in line]
    assert len(error_lines) == 1 and "the last good checkpoint (step 2) is kept" in error_lines[0]


def test_a_stop_request_abandons_an_evaluation_and_checkpoints(tiny_config, tmp_path, monkeypatch):
    tiny_config.train.num_steps = 10
    tiny_config.evals.validation.every = 3
    tiny_config.train.checkpoint_every = 100
    tiny_config.data.eval_batch_size = 8  # several batches per evaluation
    real_build = pipeline.build_eval_batches
    served = []

    def build_and_signal(config, **kwargs):
        for batch in real_build(config, **kwargs):
            served.append(kwargs.get("split"))
            if len(served) == 2:  # SIGTERM arrives in the middle of the first evaluation
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(pipeline, "build_eval_batches", build_and_signal)
    with pytest.raises(train.TrainingStopped) as stopped:
        train.train_and_evaluate(tiny_config, tmp_path)
    assert (stopped.value.step, stopped.value.reason) == (3, "SIGTERM")
    assert len(served) == 2  # no batch was evaluated after the request
    assert checkpointing.saved_steps(tmp_path) == [3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    log_text = (tmp_path / "train.log").read_text()
    assert "evaluation at step 3 abandoned" in log_text
    assert log_text.rstrip().endswith(
        f"stopped at step 3 of 10 (SIGTERM); checkpoint saved; run the same command again (same "
        f"--workdir {tmp_path}) to continue")


def test_coupling_off_gives_bit_for_bit_the_plain_step(tiny_config):
    mesh = parallel.create_mesh()
    model, tx, _, state = state_lib.create_state(tiny_config, mesh)
    batch = parallel.global_batch(first_batch(tiny_config), mesh)
    assert tiny_config.loss.weights.co_annotation == 0.0  # the shipped configs: couplings off
    assert coupling_for(tiny_config) is None
    plain = {k: tiny_config.loss.weights[k] for k in ("expression", "au", "va")}
    results = []
    for weights in (plain, tiny_config.loss.weights):
        step = jax.jit(make_train_step(model, tx, weights, coupling_for(tiny_config)))
        results.append(step(state, batch))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_coupling_switches_from_the_config_train_and_are_logged(tiny_config, tmp_path):
    tiny_config.evals.validation.every = 0
    tiny_config.loss.weights.co_annotation = 1.0
    tiny_config.loss.weights.distribution_matching = 0.5
    tiny_config.loss.distribution_matching.stop_gradient = True
    results = train.train_and_evaluate(tiny_config, tmp_path)
    assert math.isfinite(results["test/expression_accuracy"])
    from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/co_annotation", "loss/distribution_matching"} <= tags
    log_text = (tmp_path / "train.log").read_text()
    assert "coupling losses on (co_annotation 1, distribution_matching 0.5), relatedness: du2014" \
        in log_text
    assert "co_annotation " in log_text and "distribution_matching " in log_text  # console lines


def test_the_best_evaluation_is_kept_between_checkpoint_steps(tiny_config, tmp_path):
    # Evaluations at steps 2 and 4, checkpoints only every 100 steps (and at the end): the best
    # evaluated state must still be kept.
    tiny_config.train.num_steps = 6
    tiny_config.evals.validation.every = 2
    tiny_config.train.checkpoint_every = 100
    tiny_config.train.max_checkpoints_to_keep = 1
    train.train_and_evaluate(tiny_config, tmp_path)
    from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    accuracy = {e.step: e.value for e in events.Scalars("validation/expression_accuracy")}
    assert sorted(accuracy) == [2, 4]
    steps = checkpointing.saved_steps(tmp_path)
    assert len(steps) == 2 and steps[-1] == 6, steps  # the best one and the latest
    assert accuracy[steps[0]] == max(accuracy.values())


def test_a_failed_restart_leaves_the_run_as_it_was(tiny_config, tmp_path):
    tiny_config.evals.validation.every = 0
    train.train_and_evaluate(tiny_config, tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "config.json", tmp_path / "metrics.json")}
    changed = tiny_config
    changed.data.image_size = 48
    with pytest.raises(ConfigError, match="changed by data.image_size: 32 -> 48"):
        train.train_and_evaluate(changed, tmp_path)
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    changed.data.image_size = 32
    assert evaluate.evaluate_workdir(tmp_path)["step"] == tiny_config.train.num_steps


def test_a_finished_run_is_not_trained_or_evaluated_again(tiny_config, tmp_path, monkeypatch):
    tiny_config.evals.validation.every = 0
    results = train.train_and_evaluate(tiny_config, tmp_path)
    monkeypatch.setattr(evaluate, "evaluate", None)  # any evaluation would fail
    again = train.train_and_evaluate(tiny_config, tmp_path)
    assert again == results
    log_text = (tmp_path / "train.log").read_text()
    assert "the run is complete (step 4 of 4)" in log_text
    assert log_text.count("work directory:") == 2  # appended, one line per invocation


def test_a_run_stopped_in_its_final_evaluation_only_evaluates_on_restart(tiny_config, tmp_path,
                                                                         monkeypatch):
    tiny_config.evals.validation.every = 0
    real_evaluate = evaluate.evaluate
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: (_ for _ in ()).throw(
        evaluate.Interrupted("stop")))
    with pytest.raises(train.TrainingStopped, match="final evaluation was interrupted"):
        train.train_and_evaluate(tiny_config, tmp_path)
    assert checkpointing.saved_steps(tmp_path) == [4] and not (tmp_path / "metrics.json").exists()
    monkeypatch.setattr(evaluate, "evaluate", real_evaluate)
    results = train.train_and_evaluate(tiny_config, tmp_path)
    assert results["step"] == 4 and (tmp_path / "metrics.json").exists()
    assert "has no final evaluation: evaluating now" in (tmp_path / "train.log").read_text()


def test_a_signal_during_the_stop_exchange_counts_at_the_next_exchange(monkeypatch):
    """The answer is the exchange's: a SIGTERM that lands while the processes exchange their
    flags (the others sent no stop) must not stop this process alone."""
    sent = []
    stop = signals.StopSignals()

    def exchange(flag):  # the other processes sent False; the signal arrives meanwhile
        sent.append(flag)
        if len(sent) == 1:
            stop._handle(signal.SIGTERM, None)  # pylint: disable=protected-access
        return flag

    monkeypatch.setattr(parallel, "any_process", exchange)
    assert stop.requested() is False and stop.reason == "SIGTERM"
    assert stop.requested() is True and sent == [False, True]
    assert stop.requested() is True and sent == [False, True]  # agreed: no further exchange


def test_a_stop_on_another_process_stops_this_one(monkeypatch, caplog):
    monkeypatch.setattr(parallel, "any_process", lambda flag: True)
    stop = signals.StopSignals()
    with caplog.at_level(logging.WARNING):
        assert stop.requested() is True and stop.requested() is True
    assert stop.reason == "a stop on another process"
    assert [r.getMessage() for r in caplog.records] == [
        "a stop on another process received: saving a checkpoint and stopping"]


def test_between_agreements_several_processes_answer_without_an_exchange(monkeypatch):
    sent = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(parallel, "any_process", lambda flag: sent.append(flag) or flag)
    stop = signals.StopSignals()
    stop._handle(signal.SIGTERM, None)  # pylint: disable=protected-access
    assert stop.requested(agree=False) is False and sent == []  # counted at the next exchange
    assert stop.requested() is True and sent == [True]
    assert stop.requested(agree=False) is True and sent == [True]


def test_the_processes_agree_only_where_the_loop_waits_for_the_devices(tiny_config, tmp_path,
                                                                     monkeypatch):
    # Logged every 3 steps, checkpointed every 4: an exchange before the first step and after
    # steps 3, 4, 6, 8 and 9 (the last), none after the others (the final evaluation exchanges
    # before each of its batches). One process reads its flag after every step all the same.
    tiny_config.train.num_steps = 9
    tiny_config.train.log_every = 3
    tiny_config.train.checkpoint_every = 4
    tiny_config.evals.validation.every = 0
    steps, calls = [], []
    add, requested = progress.Progress.add, signals.StopSignals.requested
    monkeypatch.setattr(progress.Progress, "add",
                        lambda self, *args: steps.append(0) or add(self, *args))
    monkeypatch.setattr(signals.StopSignals, "requested", lambda self, *, agree=True: (
        calls.append((len(steps), agree)) or requested(self, agree=agree)))
    train.train_and_evaluate(tiny_config, tmp_path)
    assert {step for step, agree in calls if agree} == {0, 3, 4, 6, 8, 9}
    assert {step for step, _ in calls} == set(range(10))


def test_one_process_stops_at_the_step_after_a_ctrl_c(tiny_config, tmp_path, monkeypatch):
    # Neither logged nor checkpointed, step 3 is still where a single process stops.
    tiny_config.train.num_steps = 10
    tiny_config.train.log_every = 100
    tiny_config.train.checkpoint_every = 100
    tiny_config.evals.validation.every = 0
    steps = []
    add = progress.Progress.add

    def add_and_signal(self, *args):
        add(self, *args)
        steps.append(0)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(progress.Progress, "add", add_and_signal)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(train.TrainingStopped) as stopped:
        train.train_and_evaluate(tiny_config, tmp_path)
    assert (stopped.value.step, stopped.value.reason) == (3, "SIGINT")
    assert len(steps) == 3 and checkpointing.saved_steps(tmp_path) == [3]
    assert signal.getsignal(signal.SIGINT) is handler  # restored


_DOUBLE_CTRL_C = r"""
import os, signal, sys, time
from fbnet_jax.train import signals
log_file = sys.argv[1]
open(log_file, "w").close()
with signals.StopSignals(log_file) as stop:
    os.kill(os.getpid(), signal.SIGINT)
    while not stop.requested():  # the first press only asks the run to stop
        time.sleep(0.01)
    print("first press handled", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
print("not reached")
"""


def test_a_second_ctrl_c_quits_at_once(tmp_path):
    log_file = tmp_path / "train.log"
    result = subprocess.run([sys.executable, "-c", _DOUBLE_CTRL_C, str(log_file)], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 130, result.stderr
    assert result.stdout == "first press handled\n"
    assert result.stderr.splitlines()[-1].endswith(
        " WARNING: second SIGINT: quitting now, without a checkpoint")
    assert "SIGINT received: saving a checkpoint and stopping (press Ctrl-C again" \
        in result.stderr
    assert log_file.read_text().endswith(
        " WARNING: second SIGINT: quitting now, without a checkpoint\n")


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_schedule_peaks_and_survives_runs_shorter_than_the_warm_up(tiny_config, schedule):
    tiny_config.optimizer.schedule = schedule
    tiny_config.optimizer.warmup_steps = 10
    _, lr = state_lib.create_optimizer(tiny_config.optimizer, 100)
    peak = tiny_config.optimizer.learning_rate
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(peak)
    if schedule == "cosine":
        assert float(lr(100)) == pytest.approx(peak * tiny_config.optimizer.end_learning_rate_factor)
    _, short = state_lib.create_optimizer(tiny_config.optimizer, 2)  # shorter than the warm-up
    assert all(math.isfinite(float(short(s))) for s in range(4))


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_batches_are_placed_depth_ahead_in_order(depth):
    placed = []

    def place(batch):
        placed.append(batch)
        return -batch

    batches = train.placed_ahead(iter(range(10)), place, depth)
    for n in range(8):
        assert next(batches) == (n, -n)
        # When batch n is handed to the step, batches n+1 .. n+depth are already placed.
        assert placed == list(range(n + depth + 1))
    assert list(batches) == [(8, -8), (9, -9)]
