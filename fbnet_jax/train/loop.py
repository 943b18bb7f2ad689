"""Training: `train_and_evaluate(config, workdir)`.

The step is a pure function `train_step(state, batch) -> (state, metrics)` compiled with `jax.jit`
over a mesh of all devices (fbnet_jax.runtime.parallel); the loop around it feeds global batches, logs,
evaluates, and checkpoints the state together with the data iterator, so a run restarted in the
same work directory continues on exactly the batch where it stopped.

The lifecycle of a run (docs/design.md#runtime):
- the config is validated as a whole, and a restart is checked against the config stored in the
  run's latest checkpoint, before anything is written;
- SIGTERM and SIGINT (Ctrl-C) finish the current step (or abandon the current evaluation), save a
  checkpoint and raise `TrainingStopped`; a second Ctrl-C quits at once;
  `train.stop_after_steps` ends an invocation the same way;
- no checkpoint holds a NaN or an infinity (`checkpointing.save` refuses them);
- every log line is appended to `workdir/train.log`, and every logged step and evaluation is a
  record of `workdir/metrics.jsonl` (fbnet_jax/eval/metrics_log.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
import tensorboardX
from clu import parameter_overview

from data_pipelines import pipeline
from fbnet_jax.runtime import checkpointing
from fbnet_jax.config import checks as config_checks
from fbnet_jax.eval import evaluate, evaluators, metrics_log
from fbnet_jax.core import logs
from fbnet_jax.model import losses
from fbnet_jax.runtime import parallel
from fbnet_jax.eval import relatedness
from fbnet_jax.eval import metrics as metrics_lib
from fbnet_jax.core.errors import ConfigError, UserError
from fbnet_jax.runtime.state import TrainState, create_state

log = logging.getLogger(__name__)


def coupling_for(config: ml_collections.ConfigDict) -> losses.Coupling | None:
    """The constants of the coupling losses (None when both coupling weights are 0)."""
    weights = config.loss.weights
    if not any(weights.get(name, 0.0) for name in losses.COUPLING_TERMS):
        return None
    table = relatedness.load(config.loss.relatedness, config.data.aus)
    return losses.Coupling(table.matrix, table.prototypical,
                           stop_gradient=config.loss.distribution_matching.stop_gradient,
                           au_targets=config.loss.co_annotation.au_targets)


# Model outputs the losses read (the features stay inside the step).
LOSS_OUTPUTS = ("expression_logits", "au_logits", "va")
NONFINITE_POLICIES = ("stop", "skip")


def make_train_step(model, tx: optax.GradientTransformation, loss_weights: Mapping[str, float],
                    coupling: losses.Coupling | None = None, *, axis_name: str | None = None,
                    grad_accum_steps: int = 1, nonfinite: str = "stop"):
    """Returns the pure step `(state, batch) -> (state, metrics.StepMeans)`.

    Compile it with `parallel.StepRunner` (jit over the mesh, or pmap).

    Args:
      model: the FaceBehaviorNet; under pmap, built with `bn_axis_name=axis_name`.
      tx: the optimizer.
      loss_weights: `config.loss.weights`.
      coupling: the relatedness constants of the coupling losses (`coupling_for(config)`).
      axis_name: the pmap axis (None under jit): the losses psum their sums over it, gradients
        are pmean-ed over it (see fbnet_jax/model/losses.py on why that is exact), and each device
        draws its own dropout masks.
      grad_accum_steps: K > 1 splits the batch into K microbatches (row j of every K on each
        device) and computes the gradient of the loss of the whole batch in two passes: a
        forward pass of each microbatch gives the outputs of the whole batch, the loss and its
        gradient with respect to those outputs are computed at once (the losses are ratios of
        batch sums and CCC moments, so averaging per-microbatch losses would not give the
        batch's loss), then a forward and backward pass of each microbatch pulls that gradient
        back to the parameters. Activations of one microbatch at a time are kept; the cost is
        one extra forward pass. BatchNorm normalises each microbatch by its own statistics and
        updates its running averages once per microbatch (K times per step).
      nonfinite: "stop" applies every update (the loop stops the run when it sees a non-finite
        loss); "skip" keeps the state as it was when the loss or the gradient norm is not
        finite, and the step counts as skipped in the metrics.
    """
    weights = dict(loss_weights)
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"unknown nonfinite policy {nonfinite!r}; known: {NONFINITE_POLICIES}")

    def forward(params, batch_stats, images, rng):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True,
            rngs={"dropout": rng}, mutable=["batch_stats"])
        return {k: outputs[k] for k in LOSS_OUTPUTS}, updates.get("batch_stats", {})

    def batch_loss(outputs, batch):
        return losses.task_losses(outputs, batch, weights, axis_name=axis_name, coupling=coupling)

    def whole_batch(state, batch, rng):
        def loss_fn(params):
            outputs, batch_stats = forward(params, state.batch_stats, batch["image"], rng)
            total, terms = batch_loss(outputs, batch)
            return total, (terms, batch_stats)
        (_, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return terms, grads, batch_stats

    def accumulated(state, batch, rng):
        k = grad_accum_steps
        micro = jax.tree.map(lambda x: _microbatches(x, k), batch)
        rngs = jax.vmap(lambda j: jax.random.fold_in(rng, j))(jnp.arange(k))
        outputs = jax.lax.map(lambda xs: forward(state.params, state.batch_stats, *xs)[0],
                              (micro["image"], rngs))
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731  [K, b, ...] -> [K * b, ...]
        (_, terms), output_grads = jax.value_and_grad(batch_loss, has_aux=True)(
            jax.tree.map(flat, outputs), jax.tree.map(flat, micro))
        output_grads = jax.tree.map(lambda g: g.reshape(k, -1, *g.shape[1:]), output_grads)

        def pull_back(carry, xs):
            grads, batch_stats = carry
            images, rng_j, grads_j = xs
            _, vjp, batch_stats = jax.vjp(lambda p: forward(p, batch_stats, images, rng_j),
                                          state.params, has_aux=True)
            return (jax.tree.map(jnp.add, grads, vjp(grads_j)[0]), batch_stats), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, batch_stats), _ = jax.lax.scan(
            pull_back, (zeros, state.batch_stats), (micro["image"], rngs, output_grads))
        return terms, grads, batch_stats

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        rng = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        run = accumulated if grad_accum_steps > 1 else whole_batch
        terms, grads, batch_stats = run(state, batch, rng)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state)
        keep = jnp.isfinite(terms["total"]) & jnp.isfinite(grad_norm)
        if nonfinite == "skip":
            new_state = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_state,
                                     state.replace(step=state.step + 1))
        scalars = {f"loss/{name}": value for name, value in terms.items()}
        scalars["grad_norm"] = grad_norm
        return new_state, metrics_lib.StepMeans.from_step(scalars, keep)

    return train_step


def _microbatches(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [K, B / K, ...], microbatch j holding rows j, j + K, j + 2K, ...

    Strided rather than contiguous, so that on a batch sharded over devices in contiguous
    blocks each microbatch takes the same number of rows from every device (no data moves).
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _write_scalars(writer, records: metrics_log.Writer | None, kind: str, step: int,
                   scalars: Mapping[str, float]) -> None:
    """Scalars into TensorBoard (`writer`) and as a record of `kind` into metrics.jsonl (each
    None where it is not written: on processes other than 0, TensorBoard in a finished run)."""
    if writer is not None:
        for name, value in scalars.items():
            writer.add_scalar(name, value, step)
        writer.flush()
    if records is not None:
        records.write(kind, step, scalars)




class TrainingStopped(Exception):
    """The run stopped before its end, with its state checkpointed; run again to continue.

    Attributes:
      step: the step of the last checkpoint (where a restart continues).
      num_steps: the run's `train.num_steps`.
      reason: what stopped it: "SIGTERM", "SIGINT" or "train.stop_after_steps".
      trained: True when every step was made and only the final evaluation is missing.
    """

    def __init__(self, step: int, num_steps: int, reason: str, workdir: Path, *,
                 trained: bool = False):
        self.step, self.num_steps, self.reason, self.trained = step, num_steps, reason, trained
        what = (f"the final evaluation was interrupted ({reason}); training is complete "
                f"(step {step})" if trained else
                f"stopped at step {step} of {num_steps} ({reason}); checkpoint saved")
        super().__init__(f"{what}; run the same command again (same --workdir {workdir}) to "
                         f"continue")


class StopSignals:
    """SIGTERM and SIGINT set a flag that the loop and the evaluations check.

    The run then saves a checkpoint and stops. A second SIGINT (Ctrl-C pressed twice) quits at
    once with status 130 and no checkpoint: a save in progress is then left as a temporary
    directory that orbax ignores, so the checkpoints before it stay intact. Further SIGTERMs are
    ignored, since launchers and schedulers may deliver one signal twice.

    Every process of a multi-process run calls `requested()` at the same points, and it answers
    for all of them: SIGTERM reaching one host stops every host after the same step.

    The handler itself logs nothing (a signal can arrive while the main thread is inside a
    logging call, and logging is not reentrant): `requested()`, called from the loop, announces
    the request; the second Ctrl-C writes its line with plain `os.write`.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log_file: Path | None = None):
        self.reason: str | None = None
        self._agreed = False  # a stop was agreed by every process: every later answer is yes
        self._log_file = log_file
        self._previous = {}

    def __enter__(self) -> StopSignals:
        try:
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def requested(self) -> bool:
        """Whether the run should stop; in a multi-process run, whether any process was asked
        to (a collective, so every process stops at the same step).

        The answer is the collective's, never a second look at the flag: a signal that lands
        while the processes exchange their flags is counted at the next call, on every process
        alike (else the signalled process alone would stop, and the collectives that follow
        would pair up wrongly or hang)."""
        if not self._agreed:
            if not parallel.any_process(self.reason is not None):
                return False
            self._agreed = True
            if self.reason is None:
                self.reason = "a stop on another process"
            log.warning("%s received: saving a checkpoint and stopping%s", self.reason,
                        " (press Ctrl-C again to quit at once, losing the steps since the last "
                        "checkpoint)" if self.reason == "SIGINT" else "")
        return True

    def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
        if self.reason is None:
            self.reason = signal.Signals(signum).name
        elif signum == signal.SIGINT:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            line = "WARNING: second SIGINT: quitting now, without a checkpoint\n"
            os.write(2, f"{stamp[11:]} {line}".encode())
            if self._log_file is not None:
                with contextlib.suppress(OSError):
                    fd = os.open(self._log_file, os.O_WRONLY | os.O_APPEND)
                    os.write(fd, f"{stamp} {line}".encode())
                    os.close(fd)
            os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *,
                       allow_config_change: bool = False) -> dict[str, float]:
    """Trains, evaluates periodically and at the end, and returns the final test metrics.

    Leaves in `workdir`: `config.json`, `train.log`, `metrics.jsonl` (fbnet_jax/eval/metrics_log.py),
    `checkpoints/` (orbax), `tensorboard/` (event files) and `metrics.json` (flat, the metrics of
    the final evaluators of `config.evals`).
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


def _check_workdir(config, workdir: Path, allow_config_change: bool) -> tuple[list[str], int | None]:
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
    manager = checkpointing.create_manager(workdir, read_only=True)
    try:
        saved = checkpointing.read_config(manager, latest)
    finally:
        manager.close()
    notes = config_checks.check_restart(saved, config, step=latest,
                                        allow_changes=allow_config_change,
                                        what=f"the run in {workdir}")
    if latest > config.train.num_steps:
        raise ConfigError(f"train.num_steps is {config.train.num_steps}, but the run in {workdir} "
                          f"is at step {latest} already")
    return notes, latest


PROFILE_DIR = "profile"
REPORT_DIR = "report"  # the final evaluation's report.md, report.html and plots


def memory_line(compiled) -> str:
    """What a compiled step needs per device, from XLA's memory analysis (when it has one)."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):
        stats = None
    if stats is None:
        return "no memory analysis on this backend"
    mib = lambda n: n / 2**20  # noqa: E731
    return (f"per device: {mib(stats.argument_size_in_bytes):.1f} MiB arguments, "
            f"{mib(stats.output_size_in_bytes):.1f} MiB outputs "
            f"({mib(stats.alias_size_in_bytes):.1f} MiB of them donated), "
            f"{mib(stats.temp_size_in_bytes):.1f} MiB temporaries, "
            f"{mib(stats.generated_code_size_in_bytes):.1f} MiB code")


class Profiler:
    """A `jax.profiler` trace of `num_steps` train steps (`config.train.profile_steps`), taken
    from the second step of the invocation on (the first compiles), into `directory`; viewable
    in TensorBoard's profile plugin or Perfetto. 0 steps: nothing is traced."""

    def __init__(self, directory: Path, num_steps: int):
        self.directory, self.num_steps = directory, int(num_steps)
        self.first = self.traced = None

    def before_step(self, step: int) -> None:
        if self.num_steps > 0 and self.first is None and jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.first, self.traced = step + 1, 0

    def after_step(self, step: int, step_metrics) -> None:
        if self.traced is None:
            return
        self.traced += 1
        if self.traced == self.num_steps:
            jax.block_until_ready(step_metrics)
            self.close()

    def close(self) -> None:
        """Ends the trace (also when the loop ends early); logs where it is."""
        if self.traced is not None:
            jax.profiler.stop_trace()
            log.info("profile of steps %d-%d written to %s", self.first,
                     self.first + self.traced - 1, self.directory)
            self.traced = None


def _run(config, workdir: Path, latest: int | None, stop: StopSignals,
         records: metrics_log.Writer | None):
    """Builds everything, restores, trains, evaluates; returns metrics or a TrainingStopped."""
    is_main = jax.process_index() == 0
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
    train_cfg = config.train
    manager = checkpointing.create_manager(
        workdir, max_to_keep=train_cfg.max_checkpoints_to_keep,
        best_metric=train_cfg.best_metric or None, best_mode=train_cfg.best_mode)
    try:
        if latest is not None and latest == train_cfg.num_steps:
            return _finished_run(config, workdir, mesh, model, state, manager, latest, stop,
                                 records)
        coupling = coupling_for(config)
        if coupling is not None:
            log.info("coupling losses on (%s), relatedness: %s", ", ".join(
                f"{name} {config.loss.weights[name]:g}" for name in losses.COUPLING_TERMS
                if config.loss.weights.get(name, 0.0)), config.loss.relatedness)
        mode = config.parallel.mode
        axis_name = parallel.DATA_AXIS if mode == "pmap" else None
        train_step = parallel.StepRunner(make_train_step(
            model.clone(bn_axis_name=axis_name), tx, config.loss.weights, coupling,
            axis_name=axis_name, grad_accum_steps=train_cfg.grad_accum_steps,
            nonfinite=train_cfg.nonfinite), mode, mesh)
        log.info("step: %s over %d device(s)%s%s", "jax.pmap" if mode == "pmap" else "jax.jit",
                 jax.device_count(), f", {train_cfg.grad_accum_steps} microbatches per step"
                 if train_cfg.grad_accum_steps > 1 else "",
                 f", {config.model.dtype} backbone" if config.model.dtype != "float32" else "")
        if latest is not None:
            state, _ = checkpointing.restore(manager, checkpointing.abstract_like(state),
                                             step=latest)
            log.info("resumed from the checkpoint of step %d", latest)
        elif is_main:
            log.info("no checkpoint in %s: starting at step 0", workdir)
        pipeline.render_ahead(config.data)  # with data.render_cache_dir: faces rendered once
        # The data order is a function of the step: the iterator starts at the step's batch.
        data_iterator = pipeline.build_train_iterator(config, start_step=latest or 0)
        writer = tensorboardX.SummaryWriter(str(workdir / "tensorboard")) if is_main else None
        try:
            if is_main:  # only now: a restart that failed has not replaced the run's config
                (workdir / "config.json").write_text(config.to_json(indent=2))
            profiler = Profiler(workdir / PROFILE_DIR, config.train.get("profile_steps", 0))
            try:
                return _train_loop(config, workdir, mesh, model, state, train_step, schedule,
                                   manager, data_iterator, writer, records, stop, profiler)
            finally:
                profiler.close()
        finally:
            pipeline.close_iterator(data_iterator)
            if writer is not None:
                writer.close()
    finally:
        manager.wait_until_finished()
        manager.close()


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
    _write_scalars(writer, records, "final", step, final)
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


def _check_nonfinite(interval: metrics_lib.StepMeans, policy: str, limit: int, first: int,
                     last: int, run_before: int, last_checkpoint: int | None) -> int:
    """Checks the steps first+1..last for a stop (`train.nonfinite`).

    Under "stop" any non-finite step stops the run; under "skip", `limit` skipped steps in a row,
    counting the `run_before` skipped steps that ended the previous interval.

    Returns:
      The skipped steps that end this interval (the next call's `run_before`).

    Raises:
      FloatingPointError: the run must stop.
    """
    skipped, steps = int(interval.skipped), int(interval.steps)
    if not skipped:
        return 0
    advice = (f"the last good checkpoint (step {last_checkpoint}) is kept. Lower "
              f"optimizer.learning_rate or check the data.")
    if policy == "stop":
        raise FloatingPointError(
            f"non-finite loss or gradient in {skipped} of the steps {first + 1}-{last}; {advice}")
    longest = max(int(interval.longest_skip_run), run_before + int(interval.leading))
    if longest >= limit:
        raise FloatingPointError(
            f"{longest} steps in a row had a non-finite loss or gradient and were skipped "
            f"(up to step {last}; train.nonfinite_max_in_a_row is {limit}); {advice}")
    log.warning("skipped %d of the steps %d-%d: non-finite loss or gradient "
                "(train.nonfinite = 'skip')", skipped, first + 1, last)
    return run_before + steps if skipped == steps else int(interval.trailing)


def _train_loop(config, workdir, mesh, model, state, train_step, schedule, manager, data_iterator,
                writer, records, stop: StopSignals, profiler: "Profiler"):
    """The loop of `train_and_evaluate`: final metrics, or a TrainingStopped to raise."""
    train_cfg = config.train
    num_steps = train_cfg.num_steps
    batch_size = config.data.global_batch_size
    step = int(jax.device_get(state.step))
    state = train_step.layout(state)  # the step's layout from here on (pmap: one copy per device)
    nonfinite_limit = train_cfg.nonfinite_max_in_a_row
    stop_at = min(num_steps, step + train_cfg.stop_after_steps) if train_cfg.stop_after_steps \
        else num_steps
    running = metrics_lib.StepMeans.empty()  # step metrics since the last log, on device
    names = pipeline.source_names(config.data)
    seen = np.zeros(len(names), np.int64)  # this process's examples per source since the log
    periodic = [e for e in evaluators.from_config(config) if e.every]
    predict_fns = {}  # compiled once for every evaluation (evaluate.Predictions)
    last_checkpoint = manager.latest_step()
    interval_start, interval_step = time.perf_counter(), step
    flushed_step, skip_run = step, 0  # the last flush; skipped steps in a row up to it
    steps_per_second = 0.0
    best_metric_missing_warned = False

    def flush(step: int) -> dict[str, float]:
        """Checks and logs the metrics accumulated since the last flush."""
        nonlocal running, seen, interval_start, interval_step, steps_per_second
        nonlocal flushed_step, skip_run
        interval, running = running, metrics_lib.StepMeans.empty()
        scalars = interval.compute()
        if not scalars:
            return {}
        skip_run = _check_nonfinite(interval, train_cfg.nonfinite, nonfinite_limit, flushed_step,
                                    step, skip_run, last_checkpoint)
        flushed_step = step
        # The mixture as drawn: fraction of examples per source (compare with the weights).
        scalars.update({f"data/fraction/{name}": float(count) / max(seen.sum(), 1)
                        for name, count in zip(names, seen)})
        seen = np.zeros_like(seen)
        now = time.perf_counter()
        if step > interval_step:  # else only the compilation step ran since the last flush
            steps_per_second = (step - interval_step) / max(now - interval_start, 1e-9)
            interval_start, interval_step = now, step
        scalars["learning_rate"] = float(schedule(step))
        scalars["steps_per_second"] = steps_per_second
        scalars["examples_per_second"] = steps_per_second * batch_size
        scalars["skipped_steps"] = float(interval.skipped)
        _write_scalars(writer, records, "train", step, scalars)
        eta = (num_steps - step) / steps_per_second if steps_per_second else float("nan")
        log.info("step %*d/%d (%3.0f%%) | %.2f steps/s %.0f ex/s | ETA %s | loss %.4f | %s | lr %.2e",
                 len(str(num_steps)), step, num_steps, 100 * step / num_steps, steps_per_second,
                 steps_per_second * batch_size, _format_duration(eta), scalars["loss/total"],
                 " ".join(f"{k[5:]} {v:.4f}" for k, v in scalars.items()
                          if k.startswith("loss/") and k != "loss/total"),
                 scalars["learning_rate"])
        return scalars

    def checkpoint(step: int, metrics: Mapping[str, float] | None) -> None:
        nonlocal last_checkpoint
        flush(step)  # never checkpoint a state whose losses were not checked
        best = train_cfg.best_metric
        kept = {best: metrics[best]} if metrics and best and best in metrics else None
        try:
            checkpointing.save(manager, step, train_step.global_state(state), config=config,
                               metrics=kept)
        except FloatingPointError as e:
            raise FloatingPointError(f"{e}; the training diverged at or before step {step}. The "
                                     f"last good checkpoint (step {last_checkpoint}) is kept. "
                                     f"Lower optimizer.learning_rate or check the data.") from e
        last_checkpoint = step

    first_step = True
    eval_metrics = None
    while step < stop_at and not stop.requested():
        local_batch = next(data_iterator)
        seen += pipeline.source_counts(local_batch, len(names))
        batch = train_step.batch(local_batch)
        if first_step:  # compile ahead of the call, to report its time and memory
            compile_start = time.perf_counter()
            compiled = train_step.compile(state, batch)
            log.info("train step compiled in %.1fs; %s", time.perf_counter() - compile_start,
                     memory_line(compiled))
        else:
            profiler.before_step(step)
        state, step_metrics = train_step(state, batch)
        step += 1
        profiler.after_step(step, step_metrics)
        if first_step:  # keep compilation out of the throughput numbers
            jax.block_until_ready(step_metrics)
            log.info("first step (compilation included) took %.1fs",
                     time.perf_counter() - interval_start)
            first_step = False
            interval_start, interval_step = time.perf_counter(), step
        running = running.merge(step_metrics)
        if step % train_cfg.log_every == 0:
            flush(step)
        eval_metrics = None
        due = [e for e in periodic if e.runs_at(step, num_steps)]
        if due:
            flush(step)
            try:
                eval_metrics = evaluate.evaluate(model, train_step.global_state(state), config,
                                                 mesh, due, predict_fns=predict_fns,
                                                 should_stop=stop.requested)
            except evaluate.Interrupted:
                log.info("evaluation at step %d abandoned", step)
            else:
                _write_scalars(writer, records, "eval", step, eval_metrics)
                for line in evaluate.format_summaries(eval_metrics, due):
                    log.info("%s", line)
                best = train_cfg.best_metric
                if best and best not in eval_metrics and not best_metric_missing_warned:
                    log.warning("train.best_metric %r is not among the metrics of this "
                                "evaluation (nothing labelled for it?): no best checkpoint is "
                                "kept", best)
                    best_metric_missing_warned = True
            interval_start = time.perf_counter()
        if stop.requested():
            break
        # An evaluated step is checkpointed when a best checkpoint is kept, so the best is never
        # lost to the checkpoint cadence.
        if (step % train_cfg.checkpoint_every == 0 or step == stop_at
                or (eval_metrics and train_cfg.best_metric in eval_metrics)):
            checkpoint(step, eval_metrics)
    flush(step)
    if step != last_checkpoint:  # stopped by a signal between checkpoints
        checkpoint(step, eval_metrics)
    if stop.requested():
        manager.wait_until_finished()
        return TrainingStopped(step, num_steps, stop.reason, workdir)
    if step < num_steps:
        manager.wait_until_finished()
        return TrainingStopped(step, num_steps, "train.stop_after_steps", workdir)
    return _final_evaluation(config, workdir, mesh, model, train_step.global_state(state), step,
                             writer, records, stop, predict_fns)
