"""Training: `train_and_evaluate(config, workdir)`.

The step is a pure function `train_step(state, batch) -> (state, metrics)` (step.py) compiled
with `jax.jit` over a mesh of all devices (fbnet_jax.runtime.parallel); the loop around it feeds
global batches, logs (progress.py), evaluates, and checkpoints the state together with the data
iterator, so a run restarted in the same work directory continues on exactly the batch where it
stopped.

The lifecycle of a run (docs/design.md#runtime):
- the config is validated as a whole, and a restart is checked against the config stored in the
  run's latest checkpoint, before anything is written;
- SIGTERM and SIGINT (Ctrl-C) finish the current step (or abandon the current evaluation), save a
  checkpoint and raise `TrainingStopped`; a second Ctrl-C quits at once;
  `train.stop_after_steps` ends an invocation the same way; on several processes the stop is
  agreed where the loop waits for the devices anyway (signals.py);
- no checkpoint holds a NaN or an infinity (`checkpointing.save` refuses them);
- every log line is appended to `workdir/train.log`, and every logged step and evaluation is a
  record of `workdir/metrics.jsonl` (fbnet_jax/eval/metrics_log.py).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils
import ml_collections
import tensorboardX
from clu import parameter_overview

from data_pipelines import device_augment, pipeline
from fbnet_jax.runtime import checkpointing
from fbnet_jax.train import checks as config_checks
from fbnet_jax.eval import evaluate, evaluators, metrics_log
from fbnet_jax.core import logs
from fbnet_jax.model import losses
from fbnet_jax.runtime import parallel
from fbnet_jax.core.errors import ConfigError, UserError
from fbnet_jax.runtime.state import create_state
from fbnet_jax.train.profiling import PROFILE_DIR, Profiler, memory_line
from fbnet_jax.train.progress import Progress, write_scalars
from fbnet_jax.train.signals import StopSignals, TrainingStopped
from fbnet_jax.train.step import coupling_for, make_train_step

log = logging.getLogger(__name__)

REPORT_DIR = "report"  # the final evaluation's report.md, report.html and plots


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *,
                       allow_config_change: bool = False) -> dict[str, float]:
    """Trains, evaluates periodically and at the end, and returns the final test metrics.

    Leaves in `workdir`: `config.json`, `train.log`, `metrics.jsonl`
    (fbnet_jax/eval/metrics_log.py), `checkpoints/` (orbax), `tensorboard/` (event files) and
    `metrics.json` (flat, the metrics of the final evaluators of `config.evals`).
    A work directory with checkpoints is continued from its latest one; a finished run is not
    trained again (its final metrics are returned, or computed if they are missing).

    Args:
      config: the experiment config (locked ConfigDict).
      workdir: the run's directory; created if needed.
      allow_config_change: continue a run with a config whose training-relevant fields differ
        from its checkpoint's (see `config_checks.check_restart`).

    Raises:
      ConfigError: the config is invalid, or cannot (or may not) continue the run in `workdir`;
        nothing was written.
      UserError: the work directory cannot be created.
      TrainingStopped: SIGTERM, SIGINT or `train.stop_after_steps` ended the invocation early; a
        checkpoint was saved.
      FloatingPointError: the loss or the parameters became NaN or infinite; the last good
        checkpoint is kept.
    """
    workdir = Path(workdir)
    warnings = config_checks.validate(config)
    notes, latest = _check_workdir(config, workdir, allow_config_change)
    if jax.process_count() > 1:
        # Every process reads the work directory before process 0 writes to it. A process that
        # looked after process 0 had created checkpoints/ would open a checkpoint manager, with
        # its collective syncs, that the others do not open: their collectives would pair up
        # wrongly (seen as an orbax sync name mismatch under load).
        multihost_utils.sync_global_devices("fbnet_jax:work_directory_read")
    is_main = jax.process_index() == 0
    if is_main:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the work directory {workdir}: "
                            f"{e.strerror or e}") from e
    with logs.to_file(workdir) if is_main else contextlib.nullcontext() as log_file:
        log.info("work directory: %s", workdir.absolute())
        for warning in warnings:
            log.warning("%s", warning)
        for note in notes:
            log.info("%s", note)
        with (metrics_log.Writer(workdir, latest) if is_main else contextlib.nullcontext()
              ) as records, StopSignals(log_file) as stop:
            outcome = _run(config, workdir, latest, stop, records)
        if isinstance(outcome, TrainingStopped):
            log.info("%s", outcome)
    if isinstance(outcome, TrainingStopped):
        raise outcome
    return outcome


def _check_workdir(config, workdir: Path,
                   allow_config_change: bool) -> tuple[list[str], int | None]:
    """Reads (never writes) the run in `workdir`: its latest step, and checks the restart.

    Returns:
      (notes for the log, the latest checkpoint step or None for a new run).
    """
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file, not a directory")
    steps = checkpointing.saved_steps(workdir)
    if not steps:
        return [], None
    latest = steps[-1]
    with checkpointing.create_manager(workdir, read_only=True) as manager:
        saved = checkpointing.read_config(manager, latest)
    notes = config_checks.check_restart(saved, config, step=latest,
                                        allow_changes=allow_config_change,
                                        what=f"the run in {workdir}")
    if latest > config.train.num_steps:
        raise ConfigError(f"train.num_steps is {config.train.num_steps}, but the run in {workdir} "
                          f"is at step {latest} already")
    return notes, latest


def _run(config, workdir: Path, latest: int | None, stop: StopSignals,
         records: metrics_log.Writer | None):
    """Builds everything, restores, trains, evaluates; returns metrics or a TrainingStopped.

    Every process calls `stop.requested` at the same points (`StopSignals`): with `agree` true
    before the first step, after a step that is logged, evaluated or checkpointed (the last one
    is), and at the end; with `agree` false after the other steps.
    """
    is_main = jax.process_index() == 0
    train_cfg = config.train
    num_steps = train_cfg.num_steps
    mesh = parallel.create_mesh()
    log.info("devices: %d x %s over %d process(es)", jax.device_count(),
             jax.devices()[0].device_kind, jax.process_count())
    # Pretrained weights (model.init_from) start a fresh run; a restart restores its checkpoint.
    model, tx, schedule, state = create_state(config, mesh, init_from=latest is None)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    log.info("model: %s, %.2fM parameters", config.model.backbone, num_params / 1e6)
    if is_main:
        log.info("parameters:\n%s", parameter_overview.get_parameter_overview(
            state.params, include_stats=False))
    with contextlib.ExitStack() as stack:
        manager = stack.enter_context(checkpointing.create_manager(
            workdir, max_to_keep=train_cfg.max_checkpoints_to_keep,
            best_metric=train_cfg.best_metric or None, best_mode=train_cfg.best_mode))
        if latest is not None and latest == num_steps:
            return _finished_run(config, workdir, mesh, model, state, manager, latest, stop,
                                 records)
        train_step = _step_runner(config, model, tx, mesh)
        if latest is not None:
            state, _ = checkpointing.restore(manager, checkpointing.abstract_like(state),
                                             step=latest)
            log.info("resumed from the checkpoint of step %d", latest)
        elif is_main:
            log.info("no checkpoint in %s: starting at step 0", workdir)
        pipeline.render_ahead(config.data)  # with data.render_cache_dir: faces rendered once
        # The data order is a function of the step: the iterator starts at the step's batch.
        data_iterator = pipeline.build_train_iterator(config, start_step=latest or 0)
        stack.callback(pipeline.close_iterator, data_iterator)
        batches = placed_ahead(data_iterator, train_step.batch, config.data.device_prefetch)
        writer = stack.enter_context(tensorboardX.SummaryWriter(
            str(workdir / "tensorboard"))) if is_main else None
        if is_main:  # only now: a restart that failed has not replaced the run's config
            (workdir / "config.json").write_text(config.to_json(indent=2))
        profiler = stack.enter_context(contextlib.closing(
            Profiler(workdir / PROFILE_DIR, train_cfg.get("profile_steps", 0))))

        step = start = int(jax.device_get(state.step))
        state = train_step.layout(state)  # the step's layout from here on (pmap: one per device)
        stop_at = min(num_steps, step + train_cfg.stop_after_steps) \
            if train_cfg.stop_after_steps else num_steps
        progress = Progress(config, schedule, writer, records, step)
        periodic = [e for e in evaluators.from_config(config) if e.every]
        predict_fns = {}  # compiled once for every evaluation (evaluate.Predictions)
        last_checkpoint = manager.latest_step()
        eval_metrics, best_metric_missing_warned = None, False
        while step < stop_at and not stop.requested(agree=step == start):
            local_batch, batch = next(batches)
            if step == start:  # compile ahead of the call, to report its time and memory
                compile_start = time.perf_counter()
                compiled = train_step.compile(state, batch)
                log.info("train step compiled in %.1fs; %s", time.perf_counter() - compile_start,
                         memory_line(compiled))
            else:
                profiler.before_step(step)
            state, step_metrics = train_step(state, batch)
            step += 1
            profiler.after_step(step, step_metrics)
            if step == start + 1:  # keep compilation out of the throughput numbers
                jax.block_until_ready(step_metrics)
                log.info("first step (compilation included) took %.1fs",
                         time.perf_counter() - progress.clock[0])
                progress.restart_clock(step)
            progress.add(local_batch, step_metrics)
            logged = step % train_cfg.log_every == 0
            if logged:
                progress.flush(step, last_checkpoint)
            eval_metrics = None
            due = [e for e in periodic if e.runs_at(step, num_steps)]
            if due:
                progress.flush(step, last_checkpoint)
                try:
                    eval_metrics = evaluate.evaluate(model, train_step.global_state(state), config,
                                                     mesh, due, predict_fns=predict_fns,
                                                     should_stop=stop.requested)
                except evaluate.Interrupted:
                    log.info("evaluation at step %d abandoned", step)
                else:
                    write_scalars(writer, records, "eval", step, eval_metrics)
                    for line in evaluate.format_summaries(eval_metrics, due):
                        log.info("%s", line)
                    best = train_cfg.best_metric
                    if best and best not in eval_metrics and not best_metric_missing_warned:
                        log.warning("train.best_metric %r is not among the metrics of this "
                                    "evaluation (nothing labelled for it?): no best checkpoint "
                                    "is kept", best)
                        best_metric_missing_warned = True
                progress.restart_clock(step)
            # An evaluated step is checkpointed when a best checkpoint is kept, so the best is
            # never lost to the checkpoint cadence.
            save = (step % train_cfg.checkpoint_every == 0 or step == stop_at
                    or bool(eval_metrics and train_cfg.best_metric in eval_metrics))
            if stop.requested(agree=logged or bool(due) or save):
                break
            if save:
                progress.flush(step, last_checkpoint)  # never save a state with unchecked losses
                _save(manager, config, step, train_step.global_state(state), eval_metrics,
                      last_checkpoint)
                last_checkpoint = step
        # The batches read and placed ahead are not needed any more. Dropped now, the shared
        # memory of worker-made batches is freed while the run saves and evaluates, not at exit.
        batches.close()
        local_batch = batch = None
        progress.flush(step, last_checkpoint)
        if step != last_checkpoint:  # stopped by a signal between checkpoints
            _save(manager, config, step, train_step.global_state(state), eval_metrics,
                  last_checkpoint)
        if stop.requested():
            manager.wait_until_finished()
            return TrainingStopped(step, num_steps, stop.reason, workdir)
        if step < num_steps:
            manager.wait_until_finished()
            return TrainingStopped(step, num_steps, "train.stop_after_steps", workdir)
        return _final_evaluation(config, workdir, mesh, model, train_step.global_state(state),
                                 step, writer, records, stop, predict_fns)


def placed_ahead(iterator: Iterator[Any], place: Callable[[Any], Any],
                 depth: int) -> Iterator[tuple[Any, Any]]:
    """(batch, place(batch)) for each batch of `iterator`, with `depth` batches placed ahead.

    Placing a batch on the devices starts its transfer and returns at once, so the transfers of
    the next `depth` batches run while the step computes (0: each batch is placed when the step
    takes it). The batches come in `iterator`'s order; those placed ahead when the loop stops
    are dropped (the iterator has no state to lose: batch n is a function of the step).
    """
    ahead: collections.deque = collections.deque()
    for local_batch in iterator:
        ahead.append((local_batch, place(local_batch)))
        if len(ahead) > depth:
            yield ahead.popleft()
    yield from ahead


def _step_runner(config, model, tx, mesh) -> parallel.StepRunner:
    """The train step of `config`, compiled for `config.parallel.mode` over `mesh`."""
    coupling = coupling_for(config)
    if coupling is not None:
        log.info("coupling losses on (%s), relatedness: %s", ", ".join(
            f"{name} {config.loss.weights[name]:g}" for name in losses.COUPLING_TERMS
            if config.loss.weights.get(name, 0.0)), config.loss.relatedness)
    train_cfg, mode = config.train, config.parallel.mode
    axis_name = parallel.DATA_AXIS if mode == "pmap" else None
    train_step = parallel.StepRunner(make_train_step(
        model.clone(bn_axis_name=axis_name), tx, config.loss.weights, coupling,
        axis_name=axis_name, grad_accum_steps=train_cfg.grad_accum_steps,
        nonfinite=train_cfg.nonfinite,
        augment=device_augment.DeviceAugment.from_config(config.data.augment),
        seed=config.seed), mode, mesh)
    log.info("step: %s over %d device(s)%s%s", "jax.pmap" if mode == "pmap" else "jax.jit",
             jax.device_count(), f", {train_cfg.grad_accum_steps} microbatches per step"
             if train_cfg.grad_accum_steps > 1 else "",
             f", {config.model.dtype} backbone" if config.model.dtype != "float32" else "")
    return train_step


def _save(manager, config, step: int, state, metrics: Mapping[str, float] | None,
          last_checkpoint: int | None) -> None:
    """Checkpoints `state` at `step`, with the best metric of `metrics` when one is kept."""
    best = config.train.best_metric
    kept = {best: metrics[best]} if metrics and best and best in metrics else None
    try:
        checkpointing.save(manager, step, state, config=config, metrics=kept)
    except FloatingPointError as e:
        raise FloatingPointError(f"{e}; the training diverged at or before step {step}. The "
                                 f"last good checkpoint (step {last_checkpoint}) is kept. "
                                 f"Lower optimizer.learning_rate or check the data.") from e


def _finished_run(config, workdir, mesh, model, state, manager, step, stop, records):
    """A restart of a run whose training is complete: its final metrics, computed if missing."""
    saved = Path(workdir) / "metrics.json"
    if saved.exists():
        metrics = json.loads(saved.read_text())
        if metrics.get("step") == step:
            final = [e for e in evaluators.from_config(config) if e.final]
            log.info("the run is complete (step %d of %d); its final evaluation (%s):\n%s",
                     step, config.train.num_steps, saved.absolute(),
                     evaluate.format_round(metrics, final))
            log.info("to evaluate it again or on another split: fbnet eval --workdir %s", workdir)
            return metrics
    log.info("the run finished training (step %d) but has no final evaluation: evaluating now",
             step)
    state, _ = checkpointing.restore(manager, checkpointing.abstract_like(state), step=step)
    return _final_evaluation(config, workdir, mesh, model, state, step, None, records, stop)


def _final_evaluation(config, workdir, mesh, model, state, step, writer, records, stop,
                      predict_fns=None):
    """The final evaluators (`final=True`) into metrics.json and the report."""
    final_evaluators = [e for e in evaluators.from_config(config) if e.final]
    try:
        final, predictions = evaluate.evaluate(
            model, state, config, mesh, final_evaluators, predict_fns=predict_fns,
            should_stop=stop.requested, return_predictions=True)
    except evaluate.Interrupted:
        return TrainingStopped(step, config.train.num_steps, stop.reason, workdir, trained=True)
    final["step"] = float(step)
    write_scalars(writer, records, "final", step, final)
    if final_evaluators:
        log.info("final evaluation (step %d: %s):\n%s", step,
                 ", ".join(e.name for e in final_evaluators),
                 evaluate.format_round(final, final_evaluators))
    if jax.process_index() == 0:
        workdir = Path(workdir)
        evaluate.write_outputs(final, final_evaluators, predictions, workdir / "metrics.json",
                               workdir / REPORT_DIR, workdir)
    log.info("finished")
    return final
