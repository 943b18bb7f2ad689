"""Grain worker processes that die (data_pipelines/workers.py, data_pipelines/reading_board.py).

The deaths run in a fresh interpreter (`run_isolated`): a worker of the tiny synthetic config
ends itself while reading a record, and the script reports what `next()` raised, and when. The
noting of reads is tested in this process, with the test process playing a worker.
"""

import json
import os
import pickle
import signal
import threading
from multiprocessing import shared_memory

import numpy as np
import pytest

from conftest import run_isolated
from data_pipelines import reading_board, workers

# The training script of the death tests. argv: how the worker ends ("kill": SIGKILL,
# "exit0": exit status 0, which grain 0.2.18 waits on forever; "raise": a Python exception,
# which is not a death), and a folder for the dying worker's note. The first worker process to
# read its 5th record of rafdb_like claims the note, writes the record's index there, and ends.
DEATH_SCRIPT = r'''
import importlib.util, json, multiprocessing, os, signal, sys, threading, time
from absl import flags
flags.FLAGS.mark_as_parsed()
import grain
from data_pipelines import pipeline, source_build

MODE, NOTE_DIR = sys.argv[1], sys.argv[2]
BOUND_S = 120  # a hang: report it, stop this script's workers and fail


class DiesAtItsFifthRead(grain.sources.RandomAccessDataSource):
    """The synthetic source, but the first worker to read 5 of its records ends at the 5th."""

    def __init__(self, source):
        self.source, self.main_pid, self.reads = source, os.getpid(), 0

    def __len__(self):
        return len(self.source)

    def labels(self, index):  # the key without reading: what dataset sources offer
        return {"key": f"{self.source.name}/train/{index:07d}"}

    def __getitem__(self, index):
        self.reads += 1
        if self.reads == 5 and os.getpid() != self.main_pid:
            try:
                fd = os.open(os.path.join(NOTE_DIR, "died"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return self.source[index]
            os.write(fd, json.dumps({"index": int(index), "pid": os.getpid(),
                                     "time": time.time()}).encode())
            os.close(fd)
            if MODE == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if MODE == "exit0":
                os._exit(0)
            raise ValueError(f"unreadable record {index}")
        return self.source[index]


def give_up():
    print(json.dumps({"outcome": "hang"}), flush=True)
    for child in multiprocessing.active_children():
        child.kill()
    os._exit(3)


real_build_source = source_build.build_source
def build_source(name, *args, **kwargs):
    source = real_build_source(name, *args, **kwargs)
    return DiesAtItsFifthRead(source) if name == "rafdb_like" else source
source_build.build_source = build_source

spec = importlib.util.spec_from_file_location("config", "configs/synthetic.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config("tiny")
config.data.num_workers = 2
threading.Timer(BOUND_S, give_up).start()
it = pipeline.build_train_iterator(config, process_index=0, process_count=1)
result, raised = {"outcome": "endless"}, float("nan")
try:
    for _ in range(10_000):
        next(it)
except Exception as e:
    raised = time.time()
    result = {"outcome": "raised", "type": type(e).__name__, "message": str(e),
              "worker": getattr(e, "worker", None), "pid": getattr(e, "pid", None),
              "readings": [[r.source, r.index, r.key, r.read] for r in getattr(e, "readings", ())]}
finally:
    start = time.time()
    it.close()
    result["close_s"] = time.time() - start
with open(os.path.join(NOTE_DIR, "died")) as f:
    note = json.load(f)
result.update(note=note, raise_s=raised - note["time"])
print(json.dumps(result), flush=True)
os._exit(0)
'''


def _die(mode, tmp_path):
    out = run_isolated(DEATH_SCRIPT, args=(mode, str(tmp_path)), timeout=240)
    return json.loads(out.strip().splitlines()[-1])


def test_a_worker_killed_while_reading_names_itself_how_and_the_record(tmp_path):
    result = _die("kill", tmp_path)
    assert result["outcome"] == "raised", result
    assert result["type"] == "WorkerDied", result
    index, pid = result["note"]["index"], result["note"]["pid"]
    key = f"rafdb_like/train/{index:07d}"
    assert result["pid"] == pid and result["worker"] in (0, 1)
    assert result["readings"] == [["rafdb_like", index, key, False]]
    assert result["message"] == (
        f"grain worker {result['worker']} of 2 (pid {pid}) was killed by signal 9 (SIGKILL) "
        f"while reading record {index} of source 'rafdb_like' (key '{key}'); SIGKILL usually "
        f"comes from the kernel's out-of-memory killer: give the run more memory or lower "
        f"config.data.num_workers / worker_buffer_size")
    assert result["raise_s"] < 10 and result["close_s"] < 10, result


def test_a_worker_that_exits_with_status_0_is_a_death_not_a_hang(tmp_path):
    # grain 0.2.18 counts only a non-zero exit status as a failure and waits forever otherwise.
    result = _die("exit0", tmp_path)
    assert result["outcome"] == "raised", result
    index, pid = result["note"]["index"], result["note"]["pid"]
    assert result["type"] == "WorkerDied" and result["pid"] == pid, result
    assert (f"(pid {pid}) exited with status 0 while reading record {index} of source "
            f"'rafdb_like' (key 'rafdb_like/train/{index:07d}')") in result["message"]
    # Seen within poll_s, then grace_s for grain; grain's close is given up after close_s.
    assert result["raise_s"] < 10 and result["close_s"] < 10, result


def test_an_exception_in_a_worker_is_not_a_death(tmp_path):
    result = _die("raise", tmp_path)
    assert result["outcome"] == "raised", result
    assert result["type"] == "ValueError", result
    assert result["message"] == f"unreadable record {result['note']['index']}"


class Source:
    """Records whose key is `toy/<index>`; `labels` says it without reading, like the dataset
    sources; `shift` makes a read return another row (a source skipping an unreadable one)."""

    def __init__(self, with_labels=True, shift=0, fail=False):
        self.with_labels, self.shift, self.fail = with_labels, shift, fail
        self.expression_labels = np.arange(10)

    def __len__(self):
        return 10

    def __getattr__(self, name):
        if name == "labels" and self.__dict__.get("with_labels"):
            return lambda index: {"key": f"toy/{index}"}
        raise AttributeError(name)

    def __getitem__(self, index):
        if self.fail:
            raise OSError("cannot read")
        return {"key": f"toy/{index + self.shift}", "image": np.zeros((1, 1, 3), np.uint8)}


@pytest.fixture
def as_worker(monkeypatch):
    """This process as worker 1 of 2 (two read threads each); yields the main process's board."""
    board = reading_board.ReadingBoard(2, 2)
    monkeypatch.setattr(reading_board, "_worker_board", None)  # restored after the test
    pickle.loads(pickle.dumps(board)).attach(1)  # what grain's worker gets: a pickled copy
    yield board
    board.close()


def test_reads_outside_a_worker_are_the_sources_own():
    noted = reading_board.Noted(Source(), "toy")
    assert noted[3]["key"] == "toy/3"
    assert len(noted) == 10 and noted.name == "toy"
    np.testing.assert_array_equal(noted.expression_labels, np.arange(10))
    assert noted.labels(4) == {"key": "toy/4"}
    assert getattr(reading_board.Noted(Source(with_labels=False), "t"), "labels", None) is None


def test_a_worker_notes_each_read_before_it_happens(as_worker):
    board = as_worker
    assert board.pid(1) == os.getpid() and board.pid(0) == 0
    assert board.readings(0) == () and board.readings(1) == ()
    reading_board.Noted(Source(), "toy")[3]
    assert board.readings(1) == (reading_board.Reading("toy", 3, "toy/3", read=True),)
    # A read that fails is still the thread's record: it was noted first, without its key.
    with pytest.raises(OSError):
        reading_board.Noted(Source(fail=True), "failing")[7]
    assert board.readings(1) == (reading_board.Reading("failing", 7, "", read=False),)
    # The key is the record's: a source that read another row tells which.
    reading_board.Noted(Source(shift=1), "toy")[2]
    assert board.readings(1) == (reading_board.Reading("toy", 2, "toy/3", read=True),)
    assert board.readings(0) == ()


def test_the_key_of_a_record_whose_read_died_comes_from_the_labels():
    assert reading_board.Noted(Source(), "toy").key_of(7) == "toy/7"
    assert reading_board.Noted(Source(with_labels=False), "bare").key_of(7) == ""


def test_each_read_thread_has_its_own_slot(as_worker):
    board = as_worker
    reading_board.Noted(Source(), "toy")[1]
    thread = threading.Thread(target=lambda: reading_board.Noted(Source(), "other")[8])
    thread.start()
    thread.join()
    assert board.readings(1) == (reading_board.Reading("toy", 1, "toy/1", read=True),
                                 reading_board.Reading("other", 8, "toy/8", read=True))


def test_board_and_noted_source_pickle_for_the_workers():
    board = reading_board.ReadingBoard(1, 1)
    try:
        copy = pickle.loads(pickle.dumps(board))
        assert (copy.name, copy.num_workers, copy.slots, copy.memory) == (board.name, 1, 1, None)
        copy.close()  # a copy does not free the block
        attached = shared_memory.SharedMemory(board.name)
        attached.close()
        noted = pickle.loads(pickle.dumps(reading_board.Noted(Source(), "toy")))
        assert noted[2]["key"] == "toy/2" and noted.name == "toy"
    finally:
        board.close()
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(board.name)


def test_a_reading_says_whether_the_read_had_returned():
    assert reading_board.Reading("toy", 2, "toy/2", read=False).line() == (
        "while reading record 2 of source 'toy' (key 'toy/2')")
    assert reading_board.Reading("toy", 2, "", read=True).line() == (
        "after reading record 2 of source 'toy', the last record it started")


def test_the_error_pickles_with_its_details():
    error = workers.WorkerDied("message", worker=1, pid=42, how="exited with status 3",
                               readings=(reading_board.Reading("toy", 2, "toy/2", read=False),))
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.worker, copy.pid, copy.how, copy.readings) == (
        "message", 1, 42, "exited with status 3", error.readings)


@pytest.mark.parametrize("status, error, expected", [
    (os.waitid_result((1, 0, signal.SIGCHLD, 9, os.CLD_KILLED)), None,
     ("was killed by signal 9 (SIGKILL)", 9)),
    (os.waitid_result((1, 0, signal.SIGCHLD, 11, os.CLD_DUMPED)), None,
     ("was killed by signal 11 (SIGSEGV) (core dumped)", 11)),
    (os.waitid_result((1, 0, signal.SIGCHLD, 3, os.CLD_EXITED)), None,
     ("exited with status 3", None)),
    # Collected elsewhere first: grain 0.2.18's message tells the exit code.
    (None, RuntimeError("Worker process was terminated unexpectedly with exit code -6. Search"),
     ("was killed by signal 6 (SIGABRT)", 6)),
    (None, None, ("ended (its exit status was collected elsewhere)", None)),
])
def test_how_a_worker_ended(status, error, expected):
    assert workers._ending(status, error) == expected  # pylint: disable=protected-access
