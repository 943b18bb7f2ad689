"""Training: `train_and_evaluate(config, workdir)`.

The step is a pure function `train_step(state, batch) -> (state, metrics)` compiled with `jax.jit`
over a mesh of all devices (fbnet_jax.parallel); the loop around it feeds global batches, logs,
evaluates, and checkpoints the state together with the data iterator, so a run restarted in the
same work directory continues on exactly the batch where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
import tensorboardX

from data_pipelines import pipeline
from fbnet_jax import checkpointing, evaluate, losses, parallel
from fbnet_jax import metrics as metrics_lib
from fbnet_jax.state import TrainState, create_state

log = logging.getLogger(__name__)


def make_train_step(model, tx: optax.GradientTransformation, loss_weights: Mapping[str, float]):
    """Returns the pure step `(state, batch) -> (state, metrics)`; jit it with shardings."""
    weights = dict(loss_weights)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        dropout_rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            outputs, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
                rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
            total, terms = losses.task_losses(outputs, batch, weights)
            return total, (terms, updates.get("batch_stats", {}))

        (_, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {f"loss/{name}": value for name, value in terms.items()}
        metrics["grad_norm"] = optax.tree.norm(grads)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state)
        return new_state, metrics

    return train_step


class _Preemption:
    """Turns SIGTERM into a flag the loop checks, so the run checkpoints and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):  # pylint: disable=unused-argument
        log.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _write_scalars(writer, step: int, scalars: Mapping[str, float]) -> None:
    if writer is not None:
        for name, value in scalars.items():
            writer.add_scalar(name, value, step)
        writer.flush()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Trains, evaluates periodically and at the end, and returns the final test metrics.

    Leaves in `workdir`: `config.json`, `checkpoints/` (orbax), `tensorboard/` (event files) and
    `metrics.json` (flat, the final evaluation on `config.train.test_split`).

    Raises:
      FloatingPointError: the loss became NaN or infinite; the last good checkpoint is kept.
    """
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    mesh = parallel.create_mesh()
    parallel.check_batch_size(config.data.global_batch_size, mesh)
    parallel.check_batch_size(config.data.eval_batch_size, mesh, "eval batch size")
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        saved = workdir / "config.json"
        if saved.exists():  # a restart: changed shapes would fail the restore below
            changes = checkpointing.config_differences(json.loads(saved.read_text()),
                                                       json.loads(config.to_json()))
            if changes:
                log.warning("the config differs from the one %s was run with: %s", workdir,
                            "; ".join(changes))
        saved.write_text(config.to_json(indent=2))
    log.info("work directory: %s", workdir.absolute())
    log.info("devices: %d x %s over %d process(es)", jax.device_count(),
             jax.devices()[0].device_kind, jax.process_count())

    model, tx, schedule, state = create_state(config, mesh)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    log.info("model: %s, %.2fM parameters", config.model.backbone, num_params / 1e6)
    train_step = jax.jit(make_train_step(model, tx, config.loss.weights), donate_argnums=0,
                         out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)))

    train_cfg = config.train
    manager = checkpointing.create_manager(
        workdir, max_to_keep=train_cfg.max_checkpoints_to_keep,
        best_metric=train_cfg.best_metric or None, best_mode=train_cfg.best_mode)
    data_iterator = pipeline.build_train_iterator(config)
    writer = tensorboardX.SummaryWriter(str(workdir / "tensorboard")) if is_main else None
    try:
        restored = checkpointing.restore(manager, checkpointing.abstract_like(state),
                                         data_iterator=data_iterator)
        if restored is not None:
            state, step = restored
            log.info("resumed from the checkpoint of step %d", step)
        final = _train_loop(config, workdir, mesh, model, state, train_step, schedule, manager,
                            data_iterator, writer)
    finally:
        manager.wait_until_finished()
        manager.close()
        pipeline.close_iterator(data_iterator)
        if writer is not None:
            writer.close()
    return final


def _train_loop(config, workdir, mesh, model, state, train_step, schedule, manager, data_iterator,
                writer) -> dict[str, float]:
    """The loop of `train_and_evaluate`; returns the final test metrics ({} if stopped early)."""
    train_cfg = config.train
    num_steps = train_cfg.num_steps
    batch_size = config.data.global_batch_size
    step = int(jax.device_get(state.step))
    stop_at = min(num_steps, step + train_cfg.stop_after_steps) if train_cfg.stop_after_steps \
        else num_steps
    running = metrics_lib.MeanScalars.empty()  # step metrics since the last log, on device
    names = pipeline.source_names(config.data)
    seen = np.zeros(len(names), np.int64)  # this process's examples per source since the log
    predict_fn = evaluate.make_predict_fn(model)  # compiled once for every evaluation
    last_good_checkpoint = manager.latest_step()
    interval_start, interval_step = time.perf_counter(), step
    steps_per_second = 0.0

    def flush(step: int) -> dict[str, float]:
        """Checks and logs the metrics accumulated since the last flush."""
        nonlocal running, seen, interval_start, interval_step, steps_per_second
        scalars = running.compute()
        if not scalars:
            return {}
        running = metrics_lib.MeanScalars.empty()
        # The mixture as drawn: fraction of examples per source (compare with the weights).
        scalars.update({f"data/fraction/{name}": float(count) / max(seen.sum(), 1)
                        for name, count in zip(names, seen)})
        seen = np.zeros_like(seen)
        bad = sorted(k for k, v in scalars.items() if not math.isfinite(v))
        if bad:
            raise FloatingPointError(
                f"non-finite {', '.join(bad)} between steps {interval_step} and {step}; the last "
                f"good checkpoint (step {last_good_checkpoint}) is kept. Lower "
                f"optimizer.learning_rate or check the data.")
        now = time.perf_counter()
        if step > interval_step:  # else only the compilation step ran since the last flush
            steps_per_second = (step - interval_step) / max(now - interval_start, 1e-9)
            interval_start, interval_step = now, step
        scalars["learning_rate"] = float(schedule(step))
        scalars["steps_per_second"] = steps_per_second
        scalars["examples_per_second"] = steps_per_second * batch_size
        _write_scalars(writer, step, scalars)
        eta = (num_steps - step) / steps_per_second if steps_per_second else float("nan")
        log.info("step %*d/%d (%3.0f%%) | %.2f steps/s %.0f ex/s | ETA %s | loss %.4f | %s | lr %.2e",
                 len(str(num_steps)), step, num_steps, 100 * step / num_steps, steps_per_second,
                 steps_per_second * batch_size, _format_duration(eta), scalars["loss/total"],
                 " ".join(f"{k[5:]} {v:.4f}" for k, v in scalars.items()
                          if k.startswith("loss/") and k != "loss/total"),
                 scalars["learning_rate"])
        return scalars

    def checkpoint(step: int, metrics: Mapping[str, float] | None) -> None:
        nonlocal last_good_checkpoint
        flush(step)  # never checkpoint a state whose losses were not checked
        best = train_cfg.best_metric
        kept = {best: metrics[best]} if metrics and best and best in metrics else None
        checkpointing.save(manager, step, state, config=config, data_iterator=data_iterator,
                           metrics=kept)
        last_good_checkpoint = step

    with _Preemption() as preemption:
        first_step = True
        while step < stop_at:
            local_batch = next(data_iterator)
            seen += pipeline.source_counts(local_batch, len(names))
            batch = parallel.global_batch(local_batch, mesh)
            state, step_metrics = train_step(state, batch)
            step += 1
            if first_step:  # keep compilation out of the throughput numbers
                jax.block_until_ready(step_metrics)
                log.info("first step (compilation included) took %.1fs",
                         time.perf_counter() - interval_start)
                first_step = False
                interval_start, interval_step = time.perf_counter(), step
            running = running.merge(metrics_lib.MeanScalars.from_step(step_metrics))
            if step % train_cfg.log_every == 0:
                flush(step)
            eval_metrics = None
            if train_cfg.eval_every and step % train_cfg.eval_every == 0 and step < num_steps:
                flush(step)
                eval_metrics = evaluate.evaluate(model, state, config, train_cfg.eval_split,
                                                 mesh, predict_fn=predict_fn)
                _write_scalars(writer, step, eval_metrics)
                log.info("%s", evaluate.format_summary(eval_metrics, train_cfg.eval_split))
                interval_start = time.perf_counter()
            if preemption.requested:
                checkpoint(step, eval_metrics)
                log.info("stopped at step %d on SIGTERM; restart with the same --workdir to "
                         "continue", step)
                return {}
            if step % train_cfg.checkpoint_every == 0 or step == stop_at:
                checkpoint(step, eval_metrics)
        flush(step)
    if step < num_steps:
        log.info("stopped after %d steps (train.stop_after_steps); restart with the same "
                 "--workdir to continue", train_cfg.stop_after_steps)
        return {}

    final = evaluate.evaluate(
        model, state, config, train_cfg.test_split, mesh,
        threshold_split=train_cfg.eval_split if train_cfg.tune_au_thresholds else None,
        predict_fn=predict_fn)
    final["step"] = float(step)
    _write_scalars(writer, step, final)
    if jax.process_index() == 0:
        (Path(workdir) / "metrics.json").write_text(json.dumps(final, indent=2, sort_keys=True))
    log.info("final evaluation on %r (step %d):\n%s\n%s", train_cfg.test_split, step,
             evaluate.format_table(final, train_cfg.test_split),
             evaluate.format_tuned(final, train_cfg.test_split))
    log.info("metrics written to %s", Path(workdir).absolute() / "metrics.json")
    return final
