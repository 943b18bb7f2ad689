"""The render cache: synthetic faces rendered once into files, equal to the rendered records."""

import errno
import fcntl
import logging
import os
import pickle
import shutil
import threading
import time

import numpy as np
import pytest

from conftest import first_batch
from data_pipelines import pipeline, render_cache, schema, synthetic
from fbnet_jax.train import checks as config_checks
from fbnet_jax.core.errors import ConfigError, UserError

SPEC = synthetic.SyntheticSpec(num_records=30, image_size=24, seed=5, video_frames=4,
                               label_aus=(1, 12), label_va=False)


def _faces(spec=SPEC, split="train", **kwargs):
    return synthetic.SyntheticFaces(spec, split=split, name="set", source_index=2, **kwargs)


def _assert_same_record(expected, got):
    assert expected.keys() == got.keys()
    for field, value in expected.items():
        np.testing.assert_array_equal(value, got[field], err_msg=field)
        assert np.asarray(value).dtype == np.asarray(got[field]).dtype, field


def _temporaries(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def test_records_from_the_cache_equal_the_rendered_ones(tmp_path):
    faces = _faces()
    summary = render_cache.render([faces], tmp_path, processes=1)
    assert (summary["present"], summary["rendered"], summary["faces"], summary["bytes"]) == (
        0, 1, 30, 30 * 24 * 24 * 3)
    cached = render_cache.open_set(faces, tmp_path)
    assert len(cached) == 30 and repr(cached) == repr(faces)
    assert cached.spec == SPEC and cached.split == "train"
    for index in range(30):
        record = faces[index]
        _assert_same_record(record, cached[index])
        _assert_same_record({k: v for k, v in record.items() if k != schema.IMAGE},
                            cached.labels(index))
    assert cached[3][schema.KEY] == "set/train/0000003"
    # A label published only for some AUs and no VA: the masks come through as rendered.
    assert set(np.unique(np.stack([cached[i][schema.AU] for i in range(30)]))) <= {-1, 0, 1}
    assert np.isnan(cached[0][schema.VA]).all()
    with pytest.raises(IndexError, match="index 30 outside 0..29"):
        cached[30]


def test_processes_render_the_same_files_as_one(tmp_path, monkeypatch):
    sets = [_faces(), _faces(split="test", num_records=17)]
    summary = render_cache.render(sets, tmp_path / "one", processes=2)
    assert (summary["rendered"], summary["processes"]) == (2, 1)   # too few faces for two
    monkeypatch.setattr(render_cache, "FACES_PER_PROCESS", 20)
    summary = render_cache.render(sets, tmp_path / "two", processes=2)
    assert (summary["rendered"], summary["faces"], summary["processes"]) == (2, 47, 2)
    for faces in sets:
        one = render_cache.set_folder(tmp_path / "one", faces)
        two = render_cache.set_folder(tmp_path / "two", faces)
        for name in (render_cache.IMAGES_FILE, render_cache.LABELS_FILE):
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert _temporaries(tmp_path / "two") == []


def test_a_rendered_set_is_read_without_rendering(tmp_path, monkeypatch):
    faces = _faces()
    render_cache.render([faces], tmp_path, processes=1)
    expected = [faces[i] for i in (0, 29)]

    def no_rendering(*args, **kwargs):
        raise AssertionError("rendered again")

    monkeypatch.setattr(synthetic, "paint", no_rendering)
    assert render_cache.render([faces], tmp_path, processes=1) == dict(
        present=1, rendered=0, faces=0, bytes=0, seconds=0.0, processes=0)
    cached = render_cache.open_set(faces, tmp_path)
    _assert_same_record(expected[0], cached[0])
    _assert_same_record(expected[1], cached[29])


def test_the_folder_name_follows_what_the_pixels_depend_on(tmp_path, monkeypatch):
    base = render_cache.set_folder(tmp_path, _faces())
    assert base.parent == tmp_path and base.name.startswith("set.train.")
    others = [_faces(synthetic.SyntheticSpec(**{**vars(SPEC), "seed": 6})),
              _faces(split="test"), _faces(num_records=29), _faces(aus=(1, 2, 12))]
    names = {render_cache.set_folder(tmp_path, faces).name for faces in others}
    assert base.name not in names and len(names) == len(others)
    # The name and index of the source are not pixels: only the folder's readable prefix moves.
    renamed = synthetic.SyntheticFaces(SPEC, split="train", name="set", source_index=7)
    assert render_cache.set_folder(tmp_path, renamed) == base
    # A change to the generator's or renderer's code (or to OpenCV or numpy) is another set.
    monkeypatch.setattr(render_cache, "code_digest", lambda: "another renderer")
    assert render_cache.set_folder(tmp_path, _faces()) != base


@pytest.mark.parametrize("damage", ["truncated images", "other set", "missing labels"])
def test_a_damaged_folder_is_reported_and_rendered_again(tmp_path, caplog, damage):
    faces = _faces()
    render_cache.render([faces], tmp_path, processes=1)
    folder = render_cache.set_folder(tmp_path, faces)
    if damage == "truncated images":
        path = folder / render_cache.IMAGES_FILE
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "other set":
        meta = folder / render_cache.META_FILE
        meta.write_text(meta.read_text().replace('"key": "', '"key": "x'))
    else:
        (folder / render_cache.LABELS_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="fbnet.data"):
        summary = render_cache.render([faces], tmp_path, processes=1)
    assert summary["rendered"] == 1
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"render cache: {folder} is unusable (")
    assert message.endswith("); rendering it again")
    _assert_same_record(faces[29], render_cache.open_set(faces, tmp_path)[29])


def test_a_render_that_fails_leaves_no_folder(tmp_path, monkeypatch):
    faces = _faces()
    real = render_cache._render_chunk
    calls = []

    def fails_the_second_time(*args):
        calls.append(args[2:])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(render_cache, "_MAX_CHUNK", 8)
    monkeypatch.setattr(render_cache, "_render_chunk", fails_the_second_time)
    with pytest.raises(KeyboardInterrupt):
        render_cache.render([faces], tmp_path, processes=1)
    assert calls == [(0, 8), (8, 16)]
    assert [p.name for p in tmp_path.iterdir()] == [render_cache.LOCK_FILE]
    monkeypatch.setattr(render_cache, "_render_chunk", real)
    assert render_cache.render([faces], tmp_path, processes=1)["rendered"] == 1


def test_a_full_disk_is_one_clear_error_before_any_face_is_written(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(UserError) as raised:
        render_cache.render([_faces()], tmp_path, processes=1)
    assert str(raised.value) == (
        f"data.render_cache_dir: no room for set/train's rendered faces (0.1 MB) in {tmp_path} (No "
        f"space left on device); free space there, set --config.data.render_cache_dir to another "
        f"folder, or to '' to keep them in each process's memory")
    assert [p.name for p in tmp_path.iterdir()] == [render_cache.LOCK_FILE]
    # A file system without fallocate: the file stays sparse, and the render goes on.
    monkeypatch.setattr(os, "posix_fallocate", lambda *args: (_ for _ in ()).throw(
        OSError(errno.EOPNOTSUPP, "Operation not supported")))
    assert render_cache.render([_faces()], tmp_path, processes=1)["rendered"] == 1


def test_unfinished_folders_of_killed_renders_are_reported(tmp_path, caplog):
    (tmp_path / ".set.train.0123.tmp-abcd1234").mkdir()   # what a SIGKILL leaves
    with caplog.at_level(logging.WARNING, logger="fbnet.data"):
        render_cache.render([_faces()], tmp_path, processes=1)
    assert [r.getMessage() for r in caplog.records] == [
        f"render cache: {tmp_path} holds 1 unfinished folder(s) (.set.train.0123.tmp-abcd1234): "
        f"renders that were killed, or run now by another host; delete them when none is "
        f"rendering"]
    assert (tmp_path / ".set.train.0123.tmp-abcd1234").exists()   # not ours to delete


def test_a_set_another_process_finished_first_is_used(tmp_path, monkeypatch):
    faces = _faces()
    render_cache.render([faces], tmp_path / "other", processes=1)
    finished = render_cache.set_folder(tmp_path / "other", faces)
    mine = render_cache.set_folder(tmp_path / "mine", faces)
    real = render_cache._render_all

    def other_process_wins(todo, temporaries, processes):
        labels = real(todo, temporaries, processes)
        shutil.copytree(finished, mine)   # lands while this process renders
        (mine / "from the other process").touch()
        return labels

    monkeypatch.setattr(render_cache, "_render_all", other_process_wins)
    assert render_cache.render([faces], tmp_path / "mine", processes=1)["rendered"] == 1
    assert (mine / "from the other process").exists()
    assert _temporaries(tmp_path / "mine") == []
    _assert_same_record(faces[5], render_cache.open_set(faces, tmp_path / "mine")[5])


def test_a_cached_set_pickles_without_its_mapped_file(tmp_path):
    cached = render_cache.open_set(_faces(), tmp_path, processes=1)
    record = cached[4]
    assert cached._images is not None
    copy = pickle.loads(pickle.dumps(cached))
    assert copy._images is None
    _assert_same_record(record, copy[4])


def test_the_pipeline_reads_the_same_batches_from_the_cache(tiny_config, tmp_path):
    memory = first_batch(tiny_config)
    config = tiny_config.copy_and_resolve_references()
    config.data.render_cache_dir = str(tmp_path / "cache")
    config.data.render_processes = 1
    # Every split of every cached source: 3 sources of the tiny config x (train, test,
    # validation).
    summary = pipeline.render_ahead(config.data)
    assert (summary["present"], summary["rendered"]) == (0, 9)
    assert len(list((tmp_path / "cache").glob("*.*.*/images.npy"))) == 9
    disk = first_batch(config)
    assert memory.keys() == disk.keys()
    for field in memory:
        np.testing.assert_array_equal(memory[field], disk[field], err_msg=field)
    assert pipeline.render_ahead(config.data)["present"] == 9
    batches = [pipeline.build_eval_batches(c, split="test") for c in (tiny_config, config)]
    for a, b in zip(*batches):
        for field in a:
            np.testing.assert_array_equal(a[field], b[field], err_msg=field)
    # Without a folder, nothing is rendered ahead: faces are cached in memory as read.
    assert pipeline.render_ahead(tiny_config.data) is None


def _problems(config):
    with pytest.raises(ConfigError) as raised:
        config_checks.validate(config, num_devices=1)
    return raised.value.problems


def test_render_cache_fields_are_checked(tiny_config, tmp_path):
    config = tiny_config.copy_and_resolve_references()
    config.data.render_processes = -1
    (tmp_path / "file").touch()
    config.data.render_cache_dir = str(tmp_path / "file")
    memory = "(or set it to '' to keep rendered faces in each process's memory)"
    assert _problems(config) == [
        "data.render_processes: must be >= 0, got -1",
        f"data.render_cache_dir: {tmp_path / 'file'} exists and is not a folder {memory}"]
    config.data.render_processes = 2
    config.data.render_cache_dir = str(tmp_path / "file" / "below")
    assert _problems(config) == [
        f"data.render_cache_dir: cannot create {tmp_path / 'file' / 'below'}: "
        f"{tmp_path / 'file'} is not a writable folder {memory}"]
    config.data.render_cache_dir = str(tmp_path / "new" / "folder")
    assert config_checks.validate(config, num_devices=1) == []


def test_an_unwritable_folder_is_one_clear_error(tmp_path):
    (tmp_path / "file").touch()
    with pytest.raises(UserError) as raised:
        render_cache.render([_faces()], tmp_path / "file" / "faces", processes=1)
    assert str(raised.value) == (
        f"data.render_cache_dir: cannot write rendered faces into {tmp_path / 'file' / 'faces'} "
        f"(Not a directory); set --config.data.render_cache_dir to a writable folder, or to '' "
        f"to keep them in each process's memory")


def test_the_render_cache_may_change_on_a_restart(tiny_config):
    changed = tiny_config.copy_and_resolve_references()
    changed.data.render_cache_dir = "/somewhere"
    changed.data.render_processes = 3
    assert config_checks.check_restart(tiny_config, changed, step=4) == [
        "changed (no effect on the training): data.render_cache_dir: '' -> '/somewhere'",
        "changed (no effect on the training): data.render_processes: 0 -> 3"]


def test_processes_of_one_host_render_a_folder_one_after_the_other(tmp_path, caplog):
    faces = _faces()
    render_cache.render([faces], tmp_path / "other", processes=1)
    root = tmp_path / "mine"
    root.mkdir()
    outcome = {}
    with open(root / render_cache.LOCK_FILE, "a+") as held:   # another process renders
        fcntl.flock(held, fcntl.LOCK_EX)
        with caplog.at_level(logging.INFO, logger="fbnet.data"):
            waiting = threading.Thread(target=lambda: outcome.update(
                render_cache.render([faces], root, processes=1)))
            waiting.start()
            deadline = time.time() + 30
            while not caplog.records and time.time() < deadline:
                time.sleep(0.01)
            assert [r.getMessage() for r in caplog.records] == [
                f"render cache: waiting for another process rendering into {root}"]
            assert waiting.is_alive()
            # The other process finishes the set, and lets go.
            shutil.copytree(render_cache.set_folder(tmp_path / "other", faces),
                            render_cache.set_folder(root, faces))
            fcntl.flock(held, fcntl.LOCK_UN)
            waiting.join(30)
    assert (outcome["present"], outcome["rendered"]) == (1, 0)   # nothing rendered twice
