"""The training metrics between two log lines (`Progress`), and where scalars go: TensorBoard
and the records of metrics.jsonl (`write_scalars`)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping

import ml_collections
import numpy as np
import optax
import tensorboardX

from data_pipelines import pipeline
from fbnet_jax.eval import metrics as metrics_lib
from fbnet_jax.eval import metrics_log

log = logging.getLogger(__name__)


def write_scalars(writer: tensorboardX.SummaryWriter | None, records: metrics_log.Writer | None,
                  kind: str, step: int, scalars: Mapping[str, float]) -> None:
    """Scalars into TensorBoard (`writer`) and as a record of `kind` into metrics.jsonl (each
    None where it is not written: on processes other than 0, TensorBoard in a finished run)."""
    if writer is not None:
        for name, value in scalars.items():
            writer.add_scalar(name, value, step)
        writer.flush()
    if records is not None:
        records.write(kind, step, scalars)


@dataclasses.dataclass
class Progress:
    """The steps since the last log line: their metrics (on device), the examples they drew
    per source on this process, and the clock of the throughput.

    `add` takes each step; `flush` checks the steps since the last flush for non-finite values
    (`train.nonfinite`) and writes their means, the learning rate and the throughput as a
    "train" record and a log line.

    Attributes:
      config, schedule: the run's config, and its learning rate by step.
      writer, records: see `write_scalars`.
      step: the step of the last flush.
      running: the metrics of the steps since then, on device.
      sources, seen: the mixture's sources, and this process's examples of each since then.
      skip_run: the skipped steps in a row up to `step` (`train.nonfinite = "skip"`).
      clock: (time.perf_counter(), step) where the throughput's interval began.
      steps_per_second: the throughput of the last interval.
    """

    config: ml_collections.ConfigDict
    schedule: optax.Schedule
    writer: tensorboardX.SummaryWriter | None
    records: metrics_log.Writer | None
    step: int
    skip_run: int = dataclasses.field(default=0, init=False)
    clock: tuple[float, int] = dataclasses.field(init=False)
    steps_per_second: float = dataclasses.field(default=0.0, init=False)
    running: metrics_lib.StepMeans = dataclasses.field(init=False)
    sources: list[str] = dataclasses.field(init=False)
    seen: np.ndarray = dataclasses.field(init=False)

    def __post_init__(self):
        self.running = metrics_lib.StepMeans.empty()
        self.sources = pipeline.source_names(self.config.data)
        self.seen = np.zeros(len(self.sources), np.int64)
        self.restart_clock(self.step)

    def restart_clock(self, step: int) -> None:
        """Times the throughput from now and `step` on (what ran before is not counted)."""
        self.clock = (time.perf_counter(), step)

    def add(self, local_batch: Mapping[str, np.ndarray],
            step_metrics: metrics_lib.StepMeans) -> None:
        """Takes one step: this process's rows of its batch, and its metrics."""
        self.seen += pipeline.source_counts(local_batch, len(self.sources))
        self.running = self.running.merge(step_metrics)

    def flush(self, step: int, last_checkpoint: int | None) -> None:
        """Checks and logs the metrics of the steps since the last flush (none: nothing).

        Raises:
          FloatingPointError: the run must stop (`_check_nonfinite`).
        """
        interval, self.running = self.running, metrics_lib.StepMeans.empty()
        scalars = interval.compute()
        if not scalars:
            return
        train_cfg = self.config.train
        self.skip_run = _check_nonfinite(interval, train_cfg.nonfinite,
                                         train_cfg.nonfinite_max_in_a_row, self.step, step,
                                         self.skip_run, last_checkpoint)
        self.step = step
        # The mixture as drawn: fraction of examples per source (compare with the weights).
        scalars.update({f"data/fraction/{name}": float(count) / max(self.seen.sum(), 1)
                        for name, count in zip(self.sources, self.seen)})
        self.seen = np.zeros_like(self.seen)
        start, start_step = self.clock
        if step > start_step:  # else only the compilation step ran since the last flush
            now = time.perf_counter()
            self.steps_per_second = (step - start_step) / max(now - start, 1e-9)
            self.clock = (now, step)
        batch_size = self.config.data.global_batch_size
        scalars["learning_rate"] = float(self.schedule(step))
        scalars["steps_per_second"] = self.steps_per_second
        scalars["examples_per_second"] = self.steps_per_second * batch_size
        scalars["skipped_steps"] = float(interval.skipped)
        write_scalars(self.writer, self.records, "train", step, scalars)
        num_steps = train_cfg.num_steps
        rate = self.steps_per_second
        eta = (num_steps - step) / rate if rate else float("nan")
        log.info("step %*d/%d (%3.0f%%) | %.2f steps/s %.0f ex/s | ETA %s | loss %.4f | %s | "
                 "lr %.2e", len(str(num_steps)), step, num_steps, 100 * step / num_steps, rate,
                 rate * batch_size, _format_duration(eta), scalars["loss/total"],
                 " ".join(f"{k[5:]} {v:.4f}" for k, v in scalars.items()
                          if k.startswith("loss/") and k != "loss/total"),
                 scalars["learning_rate"])


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


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
