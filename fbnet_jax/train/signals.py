"""Stopping a run: SIGTERM and SIGINT (`StopSignals`), and the stop itself (`TrainingStopped`)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import jax

from fbnet_jax.runtime import parallel

log = logging.getLogger(__name__)


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

    On several processes a stop is agreed, so that every process stops after the same step and
    saves the same checkpoint: `requested()` exchanges the flags of all processes (a blocking
    collective, `parallel.any_process`), and every process calls it at the same points. An
    exchange waits for every process, and so for the steps each has dispatched; the loop asks
    for one only where it waits for the devices anyway: before its first step, after a step
    that is logged (every `train.log_every` steps), evaluated or checkpointed, at its end, and
    before every batch of an evaluation. After the other steps it calls
    `requested(agree=False)`, which answers from the last exchange: a signal stops every
    process within `train.log_every` steps. A single process needs no exchange: there every
    call reads the flag, and a Ctrl-C stops the run after the step in progress.

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

    def requested(self, *, agree: bool = True) -> bool:
        """Whether the run should stop; in a multi-process run, whether any process was asked
        to (a collective, so every process stops at the same step).

        Args:
          agree: False on several processes answers from the last exchange, exchanging
            nothing (every process must pass the same value at the same call); one process
            reads its flag either way.

        The answer is the collective's, never a second look at the flag: a signal that lands
        while the processes exchange their flags is counted at the next exchange, on every
        process alike (else the signalled process alone would stop, and the collectives that
        follow would pair up wrongly or hang)."""
        if self._agreed:
            return True
        if not agree and jax.process_count() > 1:
            return False
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
