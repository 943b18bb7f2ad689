"""Grain worker processes that die: which one, how, and which record it was reading.

With `config.data.num_workers > 0` the training batches are read by grain worker processes. One
can die without raising anything: the kernel's out-of-memory killer sends SIGKILL, an image
decoder segfaults, native code calls `exit()`. grain 0.2.18 then raises a bare "Worker process
was terminated unexpectedly with exit code -9" that names no data, and in two cases it waits
forever: when the worker exits with status 0, and when it dies half-way through putting a batch
on its queue (the main process then blocks reading the rest of a message that never comes).

Two pieces turn any of these into one `WorkerDied` error within seconds:

* `Noted` sources (data_pipelines.reading_board) note, inside each worker, the record each read
  thread is reading on a `ReadingBoard` in shared memory, whose `worker_init_fn` has each
  worker write its pid there too.
* `WatchedIterator` wraps grain's iterator. It runs grain's `next()` on a helper thread and,
  while it waits (and at each `next()`), looks every `poll_s` seconds whether a worker's
  process has ended. A thread per worker waits for that end (`waitid` with WNOWAIT, which
  leaves the exit status for grain to collect), so the status is known even when grain's
  threads collect it first. A worker that ended while the iterator is open is a death: `next()`
  raises `WorkerDied`, naming the worker, how it died, and the records its slots hold.

Cost in the normal path: two small writes into shared memory per record in the workers (about
a microsecond), and one hand-over to the helper thread per batch (tens of microseconds).
"""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import grain

from data_pipelines.reading_board import Reading, ReadingBoard, with_key
from fbnet_jax.core import errors

log = logging.getLogger("fbnet.data")

# grain 0.2.18's words for a worker that ended with a non-zero status; its exit code is the
# fallback when something else collected the status before this module saw it.
_GRAIN_DEATH = re.compile(r"Worker process was terminated unexpectedly with exit code (-?\d+)")

# Signals that mean a crash inside the worker (native code), as opposed to one sent to it.
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}


class WorkerDied(errors.UserError, RuntimeError):
    """A grain worker process ended while the training iterator was open.

    Not the user's mistake, but the message is what they act on (memory, a record that crashes
    its decoder): `fbnet` prints it as one line and exits with status 1.

    Attributes:
      worker: the worker's index (0..num_workers-1), or None when it died before it started.
      pid: its process id (0 when unknown).
      how: how it ended, e.g. "was killed by signal 9 (SIGKILL)" or "exited with status 3".
      readings: the records its read threads had started last (`Reading`s; empty when it had
        not read any).
    """

    exit_code = errors.EXIT_FAILED

    def __init__(self, message: str, *, worker: int | None = None, pid: int = 0, how: str = "",
                 readings: tuple[Reading, ...] = ()):
        super().__init__(message)
        self.worker, self.pid, self.how, self.readings = worker, pid, how, readings

    def __reduce__(self):
        return self.__class__, self.args, self.__dict__


class _Caller:
    """Runs calls on one daemon thread, so that the caller can stop waiting for a call that
    never returns (and the interpreter can still exit)."""

    def __init__(self, name: str):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], Any]) -> None:
        self._calls.put(call)

    def result(self, timeout: float) -> tuple[bool, Any]:
        """(True, value) or (False, exception) of the oldest call; queue.Empty on timeout."""
        return self._results.get(timeout=timeout)

    def stop(self) -> None:
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            try:
                self._results.put((True, call()))
            except BaseException as e:  # pylint: disable=broad-except  # handed to the caller
                self._results.put((False, e))


class _Ends:
    """How the workers' processes ended, seen by one thread per worker that waits for its end.

    grain's own threads look at a worker about once a second and collect the exit status of
    one that died; a thread already waiting (with WNOWAIT) sees the status first. Each thread
    learns its worker's pid from the board (a restarted worker writes a new one).
    """

    def __init__(self, board: ReadingBoard, poll_s: float):
        self._board, self._poll_s = board, poll_s
        self._statuses: dict[int, Any] = {}
        self._stop = threading.Event()
        for worker in range(board.num_workers):
            threading.Thread(target=self._watch, args=(worker,), name=f"fbnet-worker-{worker}",
                             daemon=True).start()

    def status(self, pid: int) -> tuple[bool, Any]:
        """(whether the process has ended, its waitid result or None if collected elsewhere)."""
        if pid in self._statuses:
            return True, self._statuses[pid]
        try:  # it may have ended before its thread started waiting
            status = _wait_status(pid, block=False)
        except ChildProcessError:
            return True, None
        return status is not None, status

    def stop(self) -> None:
        self._stop.set()

    def _watch(self, worker: int) -> None:
        seen = 0
        while not self._stop.is_set():
            try:
                pid = self._board.pid(worker)
            except TypeError:  # the board is closed
                return
            if pid <= 0 or pid == seen:
                self._stop.wait(self._poll_s)
                continue
            seen = pid
            try:
                self._statuses[pid] = _wait_status(pid, block=True)
            except ChildProcessError:
                self._statuses[pid] = None


class WatchedIterator(grain.DatasetIterator):
    """Grain's multi-process iterator, with dead workers turned into `WorkerDied`.

    Checkpointable like the iterator it wraps (`get_state`/`set_state` are its own). Closing it
    closes that iterator and frees the board. Made for an endless stream such as the training
    mixture: any worker process that ends while the iterator is open counts as dead.

    Args:
      parent: the iterator of an `mp_prefetch` dataset whose workers attach to `board`.
      board: the workers' `ReadingBoard`; this iterator owns it from now on.
      poll_s: seconds between looks at the workers' processes.
      grace_s: once a worker is dead, how long a pending `next()` of grain may still take to
        return or raise on its own (grain notices within about a second) before it is given up.
      close_s: after a death, how long `close()` waits for grain's iterator to close before it
        stops the remaining workers itself.
    """

    def __init__(self, parent: grain.DatasetIterator, board: ReadingBoard, *,
                 poll_s: float = 0.25, grace_s: float = 3.0, close_s: float = 5.0):
        super().__init__(parent)
        self._board = board
        self._poll_s, self._grace_s, self._close_s = poll_s, grace_s, close_s
        self._caller: _Caller | None = None
        self._in_flight = False
        self._held: tuple[bool, Any] | None = None  # a result taken by get_state, for next()
        self._last_look = time.monotonic()
        self._died: WorkerDied | None = None
        self._ends = _Ends(board, poll_s)
        self._release = weakref.finalize(self, board.close)

    def __next__(self):
        self._assert_not_closed()
        if self._died is not None:
            raise self._died
        if self._held is None and not self._in_flight:
            if time.monotonic() - self._last_look >= self._poll_s:
                death = self._dead_worker()
                if death is not None:
                    self._fail(death, None)
        ok, value = self._result()
        if ok:
            return value
        if _GRAIN_DEATH.search(str(value)):
            self._fail(self._dead_worker() or (None, 0, None), value)
        # Any other error was raised in a worker and forwarded by grain, which then stops that
        # worker itself: not a death.
        raise value

    def get_state(self) -> dict[str, Any]:
        if self._in_flight:  # only after a wait was interrupted (KeyboardInterrupt)
            self._held = self._result()  # the state then counts that batch as taken
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        if self._in_flight:
            self._result()
        self._held = None
        self._parent.set_state(state)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ends.stop()
        if self._caller is not None:
            self._caller.stop()  # a call that never returns keeps its daemon thread
        try:
            if self._died is None:
                self._parent.close()
            else:
                self._close_after_death()
        finally:
            self._release()

    def _close_after_death(self) -> None:
        """Closes grain's iterator, giving up after close_s: after a death grain's close can
        wait forever (it joins a thread that still waits for the dead worker), and so would
        the workers after the dead one, which it closes in turn. Those are stopped here."""
        closer = threading.Thread(target=self._parent.close, name="fbnet-grain-close",
                                  daemon=True)
        closer.start()
        closer.join(self._close_s)
        if not closer.is_alive():
            return
        for worker in range(self._board.num_workers):
            pid = self._board.pid(worker)
            if pid > 0 and _running_child(pid):
                os.kill(pid, signal.SIGTERM)
        log.warning("grain's iterator did not close within %.0fs of a worker's death; its "
                    "remaining workers were sent SIGTERM", self._close_s)

    def __str__(self) -> str:
        return "WatchedIterator"

    def _result(self) -> tuple[bool, Any]:
        """The result of grain's next() (started unless pending), watching the workers."""
        if self._held is not None:
            result, self._held = self._held, None
            return result
        if self._caller is None:
            self._caller = _Caller("fbnet-grain-next")
            weakref.finalize(self, self._caller.stop)
        if not self._in_flight:
            self._caller.submit(self._parent.__next__)
            self._in_flight = True
        while True:
            try:
                result = self._caller.result(self._poll_s)
            except queue.Empty:
                self._look_while_waiting()
                continue
            self._in_flight = False
            return result

    def _look_while_waiting(self) -> None:
        """Raises WorkerDied if a worker is dead and grain's call has not ended in grace_s."""
        death = self._dead_worker()
        if death is None:
            return
        deadline = time.monotonic() + self._grace_s
        while time.monotonic() < deadline:
            try:
                ok, value = self._caller.result(min(self._poll_s, self._grace_s))
            except queue.Empty:
                continue
            self._in_flight = False
            if not ok and not _GRAIN_DEATH.search(str(value)):
                raise value  # forwarded from a worker, which grain then stopped
            self._fail(death, None if ok else value)
        self._fail(death, None)  # grain's call is given up; its thread stays blocked

    def _dead_worker(self) -> tuple[int | None, int, Any] | None:
        """(worker, pid, waitid result or None if collected elsewhere) of an ended worker."""
        self._last_look = time.monotonic()
        for worker in range(self._board.num_workers):
            pid = self._board.pid(worker)
            if pid <= 0:
                continue
            ended, status = self._ends.status(pid)
            if ended:
                return worker, pid, status
        return None

    def _fail(self, death: tuple[int | None, int, Any], error: Exception | None) -> None:
        worker, pid, status = death
        how, signum = _ending(status, error)
        readings = tuple(with_key(r) for r in self._board.readings(worker)) \
            if worker is not None else ()
        self._died = WorkerDied(_message(worker, self._board.num_workers, pid, how, signum,
                                         readings),
                                worker=worker, pid=pid, how=how, readings=readings)
        raise self._died from error


def _wait_status(pid: int, *, block: bool) -> Any:
    """The waitid result of child `pid` once it has ended (None: not yet, without `block`);
    the status stays for multiprocessing to collect (WNOWAIT). Raises ChildProcessError if it
    was collected already."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG))


def _running_child(pid: int) -> bool:
    try:
        return _wait_status(pid, block=False) is None
    except ChildProcessError:
        return False


def _ending(status: Any, error: Exception | None) -> tuple[str, int | None]:
    """How a worker ended and the signal that ended it (None: it exited), from its waitid
    result or, when that was collected elsewhere, grain's error message."""
    if status is not None:
        if status.si_code == os.CLD_EXITED:
            return f"exited with status {status.si_status}", None
        dumped = " (core dumped)" if status.si_code == os.CLD_DUMPED else ""
        return f"was killed by signal {_signal_name(status.si_status)}{dumped}", status.si_status
    match = _GRAIN_DEATH.search(str(error)) if error is not None else None
    if match is None:
        return "ended (its exit status was collected elsewhere)", None
    code = int(match.group(1))
    if code < 0:
        return f"was killed by signal {_signal_name(-code)}", -code
    return f"exited with status {code}", None


def _signal_name(number: int) -> str:
    try:
        return f"{number} ({signal.Signals(number).name})"
    except ValueError:
        return str(number)


def _message(worker: int | None, num_workers: int, pid: int, how: str, signum: int | None,
             readings: tuple[Reading, ...]) -> str:
    who = (f"grain worker {worker} of {num_workers} (pid {pid})" if worker is not None
           else "a grain worker process")
    if readings:
        what = "; ".join(r.line() for r in readings)
    elif worker is None:
        what = "before it started reading"
    else:
        what = "before it read any record"
    if signum == signal.SIGKILL:
        hint = ("SIGKILL usually comes from the kernel's out-of-memory killer: give the run more "
                "memory or lower config.data.num_workers / worker_buffer_size")
    elif signum in _CRASH_SIGNALS:
        hint = "a crash in native code (such as an image decoder) handling that record"
    else:
        hint = "the training cannot continue without it; resume from the last checkpoint"
    return f"{who} {how} {what}; {hint}"
