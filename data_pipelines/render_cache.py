"""Synthetic faces rendered once, in parallel, into files that every process reads.

A synthetic source with `cache=True` renders each face once. Where the rendered faces are kept
is `config.data.render_cache_dir`:

* "" (empty): in the memory of each process (`SyntheticFaces(cache=True)`), rendered as they are
  first read. Every grain worker process renders and holds its own copy, and the first epoch of
  each set runs at the renderer's speed.
* a folder: before training, every cached (source, split) of the config that the folder does not
  hold yet is rendered there by `data.render_processes` processes (`render`, called by
  `pipeline.render_ahead`), then read from there (`RenderedFaces`): the faces as one uint8 array
  file [N, S, S, 3] that each process maps into memory (all workers share the operating system's
  one copy), the labels as a small array file. Later runs with the same sets, restarts
  included, read the faces without rendering any.

A set's folder is named by its source, its split and a hash of everything its records depend on:
the `SyntheticSpec`, the split, its size, the AU list, the source code of the generator and the
renderer, and the versions of OpenCV and numpy, which draw the pixels. Records served from the
folder are equal to the ones `SyntheticFaces` renders (tests/test_render_cache.py). A folder
that is incomplete or does not match its name is reported, removed and rendered again; a render
that is stopped half-way leaves only a temporary folder (".NAME.tmp-..."), which is removed on
the way out. Processes that share a folder take turns through a lock on its `.lock` file: the
first renders, the others wait and then find its sets. Where the file system has no locks,
several may render the same set at once: each writes its own temporary folder, the first to
finish renames it into place, the others use that one and delete theirs.

The rendering processes are spawned, not forked, so a script of one's own that trains (or calls
`render`) must keep its top-level code under `if __name__ == "__main__":`, as for grain's worker
processes; `fbnet` does.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:   # Windows: no lock
    fcntl = None

import cv2
import grain
import numpy as np

from data_pipelines import schema
from data_pipelines import synthetic
from data_pipelines import synthetic_look
from data_pipelines import synthetic_render
from fbnet_jax.core.errors import UserError

log = logging.getLogger("fbnet.data")

# Bumped when the files' layout changes (the pixels are covered by the code hash).
FORMAT_VERSION = 1
IMAGES_FILE, LABELS_FILE, META_FILE = "images.npy", "labels.npz", "meta.json"
LOCK_FILE = ".lock"
_LABEL_FIELDS = (schema.EXPRESSION, schema.COMPOUND, schema.AU, schema.VA)
# Records per rendering task: enough that a task outweighs handing it over, few enough that the
# processes finish close together.
_MAX_CHUNK = 512
# Faces a spawned rendering process must have to do: starting one (a fresh interpreter importing
# OpenCV and the generator) costs about a second, 1,400 faces' rendering at 48 px.
FACES_PER_PROCESS = 2000


def default_processes() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """A hash of what draws the pixels: the generator's and renderer's source (its looks too),
    OpenCV, numpy."""
    digest = hashlib.sha256(f"{FORMAT_VERSION} {cv2.__version__} {np.__version__}".encode())
    for module in (synthetic, synthetic_look, synthetic_render):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def set_key(faces: synthetic.SyntheticFaces) -> str:
    """The hash that names a set's folder (the source's name and index are not part of it)."""
    what = repr((faces.spec, faces.split, faces.num_records, tuple(faces.aus)))
    return hashlib.sha256(f"{code_digest()} {what}".encode()).hexdigest()[:16]


def set_folder(directory: str | os.PathLike, faces: synthetic.SyntheticFaces) -> Path:
    """Where `faces` are kept under the cache folder `directory` ("~" is expanded)."""
    return Path(directory).expanduser() / f"{faces.name}.{faces.split}.{set_key(faces)}"


def _problem(folder: Path, faces: synthetic.SyntheticFaces) -> str | None:
    """What is wrong with a set's folder (None: it holds `faces`, complete)."""
    size = faces.spec.image_size
    try:
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("key") != set_key(faces) or meta.get("format") != FORMAT_VERSION:
            return f"{META_FILE} describes another set ({meta.get('key')!r})"
        images = np.load(folder / IMAGES_FILE, mmap_mode="r")
        if images.shape != (faces.num_records, size, size, 3) or images.dtype != np.uint8:
            return f"{IMAGES_FILE} holds {images.dtype} {images.shape}"
        with np.load(folder / LABELS_FILE) as labels:
            lengths = {field: len(labels[field]) for field in _LABEL_FIELDS}
        if set(lengths.values()) != {faces.num_records}:
            return f"{LABELS_FILE} has {lengths} labels for {faces.num_records} faces"
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def _plain(faces: synthetic.SyntheticFaces) -> synthetic.SyntheticFaces:
    """The same records without a memory cache (what a rendering process needs)."""
    return synthetic.SyntheticFaces(faces.spec, split=faces.split, num_records=faces.num_records,
                                    aus=faces.aus, source_index=faces.source_index,
                                    name=faces.name)


def _render_chunk(faces: synthetic.SyntheticFaces, images_path: str, start: int,
                  stop: int) -> tuple[int, dict[str, np.ndarray]]:
    """Renders records [start, stop) into the array file; returns their labels."""
    images = np.load(images_path, mmap_mode="r+")
    labels: dict[str, list] = {field: [] for field in _LABEL_FIELDS}
    for index in range(start, stop):
        record = faces[index]
        images[index] = record[schema.IMAGE]
        for field in _LABEL_FIELDS:
            labels[field].append(record[field])
    images.flush()
    del images
    return start, {field: np.stack(values) for field, values in labels.items()}


def render(sets: Sequence[synthetic.SyntheticFaces], directory: str | os.PathLike,
           processes: int = 0) -> dict[str, Any]:
    """Renders every set of `sets` that `directory` does not hold yet.

    Args:
      sets: the sets (their spec, split, size and AU list pick the folder).
      directory: the cache folder (created if missing).
      processes: rendering processes (spawned, each rendering a share of every set); 0 = the
        cores this process may use; 1 renders in this process. Fewer are used where they would
        have under FACES_PER_PROCESS faces each.

    Returns:
      {"present": sets found complete, "rendered": sets rendered, "faces": faces rendered,
       "bytes": their pixels' size on disk, "seconds": wall time of the rendering,
       "processes": processes used}.

    Raises:
      UserError: the folder cannot be written (naming it and the way out).
      OSError: writing a set's files failed (it names the path).
    """
    root = Path(directory).expanduser()
    todo, present = _missing(root, sets)
    if not todo:
        return _summary(present, todo, 0)
    _check_writable(root)
    with _lock(root):
        # What another process rendered while this one waited for the lock is there now.
        todo, present = _missing(root, sets)
        processes = max(1, min(processes or default_processes(),
                               sum(len(f) for f in todo) // FACES_PER_PROCESS))
        summary = _summary(present, todo, processes if todo else 0)
        if not todo:
            return summary
        stale = sorted(p.name for p in root.glob(".*.tmp-*"))
        if stale:
            log.warning("render cache: %s holds %d unfinished folder(s) (%s): renders that were "
                        "killed, or run now by another host; delete them when none is rendering",
                        root, len(stale), ", ".join(stale[:3]) + (", ..." if len(stale) > 3
                                                                   else ""))
        start = time.perf_counter()
        temporaries = [root / f".{set_folder(root, f).name}.tmp-{uuid.uuid4().hex[:8]}"
                       for f in todo]
        try:
            labels = _render_all(todo, temporaries, processes)
            seconds = time.perf_counter() - start
            for faces, temporary, set_labels in zip(todo, temporaries, labels):
                _finish(faces, temporary, set_folder(root, faces), set_labels, seconds,
                        processes)
        finally:
            for temporary in temporaries:
                shutil.rmtree(temporary, ignore_errors=True)
        summary["seconds"] = time.perf_counter() - start
        return summary


def _missing(root: Path, sets) -> tuple[list[synthetic.SyntheticFaces], int]:
    """(the sets `root` does not hold complete, how many it does); unusable folders are
    reported and removed."""
    todo, present = [], 0
    for faces in sets:
        folder = set_folder(root, faces)
        if folder.exists():
            problem = _problem(folder, faces)
            if problem is None:
                present += 1
                continue
            log.warning("render cache: %s is unusable (%s); rendering it again", folder, problem)
            shutil.rmtree(folder)
        todo.append(_plain(faces))
    return todo, present


def _summary(present: int, todo, processes: int) -> dict[str, Any]:
    return dict(present=present, rendered=len(todo), faces=sum(len(f) for f in todo),
                bytes=sum(len(f) * 3 * f.spec.image_size ** 2 for f in todo), seconds=0.0,
                processes=processes)


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise UserError(
            f"data.render_cache_dir: cannot write rendered faces into {root} "
            f"({error.strerror or error}); set --config.data.render_cache_dir to a writable "
            f"folder, or to '' to keep them in each process's memory") from error


@contextlib.contextmanager
def _lock(root: Path):
    """Holds `root/.lock`, so that processes of one host (one per GPU, say) render a folder's
    sets once, one after the other, instead of all at once. Where the file system has no locks,
    nothing is held: racing processes then render the same sets and keep the first copy."""
    if fcntl is None:
        yield
        return
    with open(root / LOCK_FILE, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            log.info("render cache: waiting for another process rendering into %s", root)
            try:
                fcntl.flock(file, fcntl.LOCK_EX)
                locked = True
            except OSError:
                locked = False
        except OSError:
            locked = False
        try:
            yield
        finally:
            if locked:
                fcntl.flock(file, fcntl.LOCK_UN)


def _render_all(todo, temporaries, processes: int) -> list[dict[str, np.ndarray]]:
    """Renders the sets into their temporary folders; returns each set's labels."""
    tasks = []
    for k, (faces, temporary) in enumerate(zip(todo, temporaries)):
        temporary.mkdir()
        _allocate(temporary / IMAGES_FILE, faces)
        chunk = max(1, min(_MAX_CHUNK, math.ceil(len(faces) / (4 * processes))))
        tasks += [(k, begin, min(begin + chunk, len(faces)))
                  for begin in range(0, len(faces), chunk)]
    parts: list[dict[int, dict[str, np.ndarray]]] = [{} for _ in todo]
    if processes <= 1:
        for k, begin, end in tasks:
            parts[k][begin] = _render_chunk(todo[k], str(temporaries[k] / IMAGES_FILE),
                                            begin, end)[1]
    else:
        # Spawned, not forked: the parent may run JAX's threads, which a fork would copy
        # half-way through whatever they were doing.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
            futures = {pool.submit(_render_chunk, todo[k], str(temporaries[k] / IMAGES_FILE),
                                   begin, end): k for k, begin, end in tasks}
            try:
                for future in concurrent.futures.as_completed(futures):
                    begin, chunk_labels = future.result()
                    parts[futures[future]][begin] = chunk_labels
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return [{field: np.concatenate([part[begin][field] for begin in sorted(part)])
             for field in _LABEL_FIELDS} for part in parts]


def _allocate(path: Path, faces: synthetic.SyntheticFaces) -> None:
    """Creates the images' array file with its disk blocks reserved.

    A memory-mapped file that is only sparse would find a full disk at the first write to a
    page, which kills the writing process with SIGBUS; reserved, a full disk is an error here.
    """
    size = faces.spec.image_size
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8,
                              shape=(len(faces), size, size, 3)).flush()
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as file:
        try:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
        except OSError as error:
            if error.errno in (errno.EOPNOTSUPP, errno.EINVAL):   # a file system without it
                return
            raise UserError(
                f"data.render_cache_dir: no room for {faces.name}/{faces.split}'s rendered faces "
                f"({os.fstat(file.fileno()).st_size / 1e6:.1f} MB) in {path.parent.parent} "
                f"({error.strerror or error}); free space there, set "
                f"--config.data.render_cache_dir to another folder, or to '' to keep them in "
                f"each process's memory") from error


def _finish(faces, temporary: Path, folder: Path, labels: dict[str, np.ndarray],
            seconds: float, processes: int) -> None:
    """Writes a set's labels and description, and renames its folder into place."""
    np.savez(temporary / LABELS_FILE, **labels)
    meta = dict(format=FORMAT_VERSION, key=set_key(faces), spec=repr(faces.spec),
                split=faces.split, num_records=len(faces), aus=list(faces.aus),
                image_size=faces.spec.image_size, code=code_digest(),
                opencv=cv2.__version__, numpy=np.__version__,
                rendered_with=f"{processes} process(es), {seconds:.1f} s for the whole batch")
    (temporary / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    try:
        temporary.rename(folder)
    except OSError:
        # Another process finished the same set first: use its folder if it is whole.
        problem = _problem(folder, faces) if folder.exists() else "missing"
        if problem is not None:
            raise OSError(f"render cache: cannot move {temporary} to {folder} ({problem})")


class RenderedFaces(grain.sources.RandomAccessDataSource):
    """A set's records read from its render-cache folder (see the module docstring).

    The records are `faces`' own (the same images and labels); images are read from a
    memory-mapped file opened once per process. Other public attributes (`spec`, `split`,
    `aus`, `name`, ...) are `faces`' own.
    """

    def __init__(self, faces: synthetic.SyntheticFaces, folder: str | os.PathLike):
        self.faces = faces
        self.folder = Path(folder)
        with np.load(self.folder / LABELS_FILE) as labels:
            self._labels = {field: labels[field] for field in _LABEL_FIELDS}
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.faces)

    def __getattr__(self, attribute: str) -> Any:
        # Private names are not forwarded: unpickling looks them up before `faces` is set.
        if attribute.startswith("_") or attribute == "faces":
            raise AttributeError(attribute)
        return getattr(self.faces, attribute)

    def __getstate__(self) -> dict:
        # Each process maps the file itself.
        return {**self.__dict__, "_images": None}

    def __repr__(self) -> str:
        # The records of `faces`, so the same repr (grain's checkpoints compare sources by it).
        return repr(self.faces)

    def labels(self, index: int) -> schema.Record:
        """Record `index` without its image."""
        index = self._check(index)
        return {schema.KEY: self.faces.key(index),
                schema.SOURCE: np.int32(self.faces.source_index),
                **{field: self._labels[field][index] for field in _LABEL_FIELDS}}

    def __getitem__(self, index: int) -> schema.Record:
        index = self._check(index)
        return {schema.IMAGE: np.array(self._mapped()[index]), **self.labels(index)}

    def _getitems(self, indices) -> list[schema.Record]:
        """Records `indices` (grain's batched read): their faces copied out of the mapped file
        in one indexing."""
        rows = np.asarray([self._check(i) for i in indices], np.int64)
        images = self._mapped()[rows]
        return [{schema.IMAGE: images[j], **self.labels(int(row))} for j, row in enumerate(rows)]

    def _mapped(self) -> np.ndarray:
        """The set's faces, the file mapped into memory (once per process)."""
        if self._images is None:
            self._images = np.load(self.folder / IMAGES_FILE, mmap_mode="r")
        return self._images

    def _check(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside 0..{len(self) - 1}")
        return index


def open_set(faces: synthetic.SyntheticFaces, directory: str | os.PathLike,
             processes: int = 0) -> RenderedFaces:
    """`faces` served from the cache folder, rendered there first if it does not hold them."""
    summary = render([faces], directory, processes)
    if summary["rendered"]:
        log.info("render cache: rendered %s/%s (%d faces) in %.1f s with %d process(es)",
                 faces.name, faces.split, summary["faces"], summary["seconds"],
                 summary["processes"])
    return RenderedFaces(faces, set_folder(directory, faces))
