"""What each grain worker process is reading, in shared memory: how `workers` names a death.

* `Noted` wraps a source; inside a worker, each read first writes the source's name and the
  record's index into this read thread's slot of a `ReadingBoard` (a small block of shared
  memory), and once the read returns, that it did and the record's key. A worker that dies
  inside the read leaves no key: the main process then takes it from the source's
  `labels(index)`, which reads no image (`with_key`). A slot keeps its record until the thread
  starts the next one, so a crash while decoding, augmenting or batching it is still
  attributed to it (as "after reading").
* `ReadingBoard.worker_init_fn` runs in each worker as grain starts it: it maps the board and
  writes the worker's pid there.

Cost: two small writes into shared memory per record in the workers (about a microsecond).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import struct
import threading
import weakref
from collections.abc import Callable, Sequence
from multiprocessing import shared_memory
from typing import Any

import grain

from data_pipelines import schema

# A worker's header: its pid (0 until it starts).
_PID = struct.Struct("<q")
# A read thread's slot: the record's index (-1: none yet) and the source's name, written before
# the read; then whether the read returned (0/1) and the record's key, written once it has.
_NAME_BYTES, _KEY_BYTES = 64, 445
_SLOT = struct.Struct(f"<qH{_NAME_BYTES}sBH{_KEY_BYTES}s")
_KEY = struct.Struct(f"<BH{_KEY_BYTES}s")
_KEY_OFFSET = _SLOT.size - _KEY.size


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

    def _getitems(self, indices: Sequence[int]) -> list:
        """Records `indices`: with the source's batched read where it has one (outside a worker),
        else one at a time, each noted (inside a worker), so that a death names its record."""
        if _worker_board is None:
            return batched_read(self.source, indices)
        return [self[index] for index in indices]

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


def batched_read(source, indices: Sequence[int]) -> list:
    """Records `indices` of `source`: its batched read (`_getitems`, grain's interface for one)
    where it has one, else one `source[i]` at a time."""
    read = getattr(source, "_getitems", None)
    return list(read(indices)) if read is not None else [source[i] for i in indices]


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


def with_key(reading: Reading) -> Reading:
    """The reading, with its key from the source's labels if the worker died in the read."""
    source = _noted.get(reading.source)
    if reading.read or source is None:
        return reading
    return dataclasses.replace(reading, key=source.key_of(reading.index))
