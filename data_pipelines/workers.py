"""Grain worker processes that die: which one, how, and which record it was reading.

With `config.data.num_workers > 0` the training batches are read by grain worker processes. One
can die without raising anything: the kernel's out-of-memory killer sends SIGKILL, an image
decoder segfaults, native code calls `exit()`. grain 0.2.18 then raises a bare "Worker process
was terminated unexpectedly with exit code -9" that names no data, and in two cases it waits
forever: when the worker exits with status 0, and when it dies half-way through putting a batch
on its queue (the main process then blocks reading the rest of a message that never comes).

Three pieces turn any of these into one `WorkerDied` error within seconds:

* `Noted` wraps a source; inside a worker, each read first writes the source's name and the
  record's index into this read thread's slot of a `ReadingBoard` (a small block of shared
  memory), and once the read returns, that it did and the record's key. A
  worker that dies inside the read leaves no key: the main process then takes it from the
  source's `labels(index)`, which reads no image. A slot keeps its record until the thread
  starts the next one, so a crash while decoding, augmenting or batching it is still
  attributed to it (as "after reading").
* `ReadingBoard.worker_init_fn` runs in each worker as grain starts it: it maps the board and
  writes the worker's pid there.
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

import dataclasses
import functools
import itertools
import logging
import os
import queue
import re
import signal
import struct
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any

import grain

from data_pipelines import schema
from fbnet_jax.core import errors

log = logging.getLogger("fbnet.data")

# A worker's header: its pid (0 until it starts).
_PID = struct.Struct("<q")
# A read thread's slot: the record's index (-1: none yet) and the source's name, written before
# the read; then whether the read returned (0/1) and the record's key, written once it has.
_NAME_BYTES, _KEY_BYTES = 64, 445
_SLOT = struct.Struct(f"<qH{_NAME_BYTES}sBH{_KEY_BYTES}s")
_KEY = struct.Struct(f"<BH{_KEY_BYTES}s")
_KEY_OFFSET = _SLOT.size - _KEY.size

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


@dataclasses.dataclass(frozen=True)
class Reading:
    """The record one read thread of a worker started last."""
    source: str
    index: int
    key: str  # "" when neither the record nor the source's labels told it
    read: bool  # the source's read returned (the record was then being transformed, or done)

    def line(self) -> str:
        key = f" (key {self.key!r})" if self.key else ""
        if self.read:
            return (f"after reading record {self.index} of source {self.source!r}{key}, the "
                    f"last record it started")
        return f"while reading record {self.index} of source {self.source!r}{key}"


class Noted(grain.sources.RandomAccessDataSource):
    """A source whose reads, inside a grain worker, are noted on the worker's `ReadingBoard`.

    Outside a worker (the main process, `num_workers = 0`) reads go straight to the source.
    Attributes other than the random-access interface (`expression_labels`, `info`, ...) are the
    source's own.
    """

    def __init__(self, source, name: str):
        self.source = source
        self.name = name
        self._name_bytes = name.encode()[:_NAME_BYTES]
        _noted[name] = self  # in the main process only: workers unpickle, not construct

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, attribute: str) -> Any:
        # Private names are not forwarded: unpickling looks them up before `source` is set.
        if attribute.startswith("_") or attribute == "source":
            raise AttributeError(attribute)
        return getattr(self.source, attribute)

    def __repr__(self) -> str:
        return f"Noted({self.source!r})"

    def __getitem__(self, index: int):
        board = _worker_board
        if board is None:
            return self.source[index]
        offset = board.slot_offset()
        _SLOT.pack_into(board.memory, offset, int(index), len(self._name_bytes), self._name_bytes,
                        0, 0, b"")
        record = self.source[index]
        key = record.get(schema.KEY) if isinstance(record, dict) else None
        key = key.encode()[:_KEY_BYTES] if isinstance(key, str) else b""
        _KEY.pack_into(board.memory, offset + _KEY_OFFSET, 1, len(key), key)
        return record

    def key_of(self, index: int) -> str:
        """Record `index`'s key from the source's `labels` (which reads no image); "" for a
        source without them, or if they fail."""
        labels = getattr(self.source, "labels", None)
        if not callable(labels):
            return ""
        try:
            key = labels(index).get(schema.KEY, "")
        except Exception:  # pylint: disable=broad-except  # only for a message
            return ""
        return key if isinstance(key, str) else ""


# This process's Noted sources by name: the keys of records that a worker died reading.
_noted: weakref.WeakValueDictionary[str, Noted] = weakref.WeakValueDictionary()


class ReadingBoard:
    """Per-worker pids and per-read-thread records, in shared memory.

    Made by the main process; `worker_init_fn` attaches the workers. Picklable: a copy holds
    the block's name and layout, not the mapping. `close()` (idempotent) frees the block; if
    the main process is killed first, multiprocessing's resource tracker frees it.
    """

    def __init__(self, num_workers: int, read_threads: int):
        self.num_workers = int(num_workers)
        self.slots = max(1, int(read_threads))
        self._worker_bytes = _PID.size + self.slots * _SLOT.size
        self._shm = shared_memory.SharedMemory(create=True,
                                               size=self.num_workers * self._worker_bytes)
        self.name = self._shm.name
        self.memory = self._shm.buf
        self.memory[:] = bytes(len(self.memory))
        for worker in range(self.num_workers):
            for slot in range(self.slots):
                _SLOT.pack_into(self.memory, self._slot_offset(worker, slot), -1, 0, b"", 0, 0,
                                b"")
        self._owner = True
        self._worker = -1
        self._local = None
        self._next_slot = None

    def __getstate__(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "slots": self.slots, "name": self.name,
                "_worker_bytes": self._worker_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._shm, self.memory, self._owner, self._worker = None, None, False, -1
        self._local, self._next_slot = None, None

    def worker_init_fn(self, then: Callable[[int, int], None] | None = None
                       ) -> Callable[[int, int], None]:
        """The `worker_init_fn` for `mp_prefetch`: runs `then` (if given), then attaches."""
        return functools.partial(_attach_worker, self, then)

    def attach(self, worker: int) -> None:
        """In a worker: maps the board, writes this process's pid, and notes reads from now on."""
        global _worker_board
        self._shm = shared_memory.SharedMemory(name=self.name)
        self.memory = self._shm.buf
        self._worker = int(worker)
        self._local = threading.local()
        self._next_slot = itertools.count()
        _PID.pack_into(self.memory, self._worker * self._worker_bytes, os.getpid())
        _worker_board = self

    def slot_offset(self) -> int:
        """In a worker: where this read thread's slot is (threads take slots in turn)."""
        try:
            return self._local.offset
        except AttributeError:
            slot = next(self._next_slot) % self.slots
            self._local.offset = self._slot_offset(self._worker, slot)
            return self._local.offset

    def pid(self, worker: int) -> int:
        """The pid worker `worker` wrote when it started (0: not started)."""
        return _PID.unpack_from(self.memory, worker * self._worker_bytes)[0]

    def readings(self, worker: int) -> tuple[Reading, ...]:
        """The records the worker's read threads started last."""
        found = []
        for slot in range(self.slots):
            index, name_len, name, read, key_len, key = _SLOT.unpack_from(
                self.memory, self._slot_offset(worker, slot))
            if index >= 0:
                found.append(Reading(name[:name_len].decode(errors="replace"), index,
                                     key[:key_len].decode(errors="replace"), bool(read)))
        return tuple(found)

    def close(self) -> None:
        """In the main process: frees the block (workers keep their mappings until they end)."""
        if not self._owner:
            return
        self._owner = False
        self.memory = None
        self._shm.close()
        self._shm.unlink()

    def _slot_offset(self, worker: int, slot: int) -> int:
        return worker * self._worker_bytes + _PID.size + slot * _SLOT.size


# The board of this process when it is a grain worker (set by `ReadingBoard.attach`).
_worker_board: ReadingBoard | None = None


def _attach_worker(board: ReadingBoard, then: Callable[[int, int], None] | None,
                   worker_index: int, worker_count: int) -> None:
    if then is not None:
        then(worker_index, worker_count)
    board.attach(worker_index)


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
        readings = tuple(_with_key(r) for r in self._board.readings(worker)) \
            if worker is not None else ()
        self._died = WorkerDied(_message(worker, self._board.num_workers, pid, how, signum,
                                         readings),
                                worker=worker, pid=pid, how=how, readings=readings)
        raise self._died from error


def _with_key(reading: Reading) -> Reading:
    """The reading, with its key from the source's labels if the worker died in the read."""
    source = _noted.get(reading.source)
    if reading.read or source is None:
        return reading
    return dataclasses.replace(reading, key=source.key_of(reading.index))


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
