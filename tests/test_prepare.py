"""`fbnet prepare` (data_pipelines.tfds_builders) and the `prepared` source that reads it back."""

import contextlib
import io
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from data_pipelines import transforms
from data_pipelines.sources import BadRecordError, DatasetError, get_source
from data_pipelines.sources.prepared import open_prepared
from data_pipelines.tfds_builders import faces, prepare

HEADER = "path,expression,AU12,AU4,valence,arousal,subject,split,x0,y0,x1,y1"
# name, shape (None: corrupt), expression, AU12, AU4, valence, arousal, split, box
ROWS = [
    ("a.png", (12, 16, 3), "4", "1", "0", "0.5", "0.25", "train", ""),
    ("b.jpg", (16, 16, 3), "", "0", "", "", "", "train", ""),
    ("c.png", None, "1", "", "", "", "", "train", ""),
    ("d.png", (20, 24, 3), "6", "", "", "", "", "train", "4,3,14,13"),
    ("e.jpg", (16, 8, 3), "", "", "", "-0.5", "0.75", "validation", ""),
    ("f.png", (10, 10), "neutral", "", "", "", "", "validation", ""),
    ("g.png", (9, 7, 3), "3", "", "1", "", "", "test", ""),
    ("h.png", (9, 7, 3), "9", "", "", "", "", "test", ""),
    ("i.jpg", (8, 8, 3), "2", "1", "", "", "", "test", ""),
]
COUNT_LINES = [
    "  options: image_size=0, margin=0.2, seed=0, test_fraction=0.1, validation_fraction=0.1",
    "  train: 3 record(s) written, 1 skipped (1 unreadable image)",
    "  validation: 2 record(s) written, 0 skipped",
    "  test: 2 record(s) written, 1 skipped (1 unreadable label)",
]


def _dataset(folder, rows=ROWS, split_column=True):
    """A manifest dataset: PNG, JPEG and greyscale images, one corrupt image (c.png, train),
    one face box (d.png) and one row with an unknown expression (h.png, test). `rows`: other
    rows; without `split_column` the manifest's seeded hash splits the images."""
    rng = np.random.default_rng(0)
    header = HEADER if split_column else HEADER.replace(",split", "")
    lines = [header]
    for name, shape, *labels, box in rows:
        path = folder / "img" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if shape is None:
            path.write_bytes(b"\x89PNG\r\n\x1a\n broken")
        else:
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        split = [labels[5]] if split_column else []
        lines.append(",".join([f"img/{name}", *labels[:5], "", *split, box or ",,,"]))
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder


def _run(*args, **kwargs):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = prepare.run_command(*args, **kwargs)
    return status, out.getvalue().splitlines()


def _files(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in folder.rglob("*")}


def _expected(manual, split, **kwargs):
    """The source's readable records of `split`, read directly."""
    source = get_source("manifest", manual, split, unreadable="mask", **kwargs)
    return [r for r in (source[i] for i in range(len(source))) if r["key"]]


def _assert_same_records(actual, expected):
    assert [r["key"] for r in actual] == [r["key"] for r in expected]
    for got, want in zip(actual, expected):
        assert got.keys() == want.keys()
        for field, value in want.items():
            if field == "key":
                assert got[field] == value and isinstance(got[field], str)
            else:
                assert np.asarray(got[field]).dtype == np.asarray(value).dtype, field
                np.testing.assert_array_equal(got[field], value, err_msg=f"{want['key']} {field}")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(dataset folder, data_dir, printed lines) of the default preparation of the fixture."""
    manual = _dataset(tmp_path_factory.mktemp("manual"))
    data_dir = tmp_path_factory.mktemp("prepared")
    status, lines = _run("manifest", manual, data_dir, [], False)
    assert status == 0
    return manual, data_dir, lines


def test_prepared_records_are_the_source_records(prepared):
    manual, data_dir, _ = prepared
    for split in faces.SPLITS:
        source = open_prepared(data_dir, split, dataset="manifest")
        expected = _expected(manual, split)
        assert len(source) == len(expected) == {"train": 3, "validation": 2, "test": 2}[split]
        _assert_same_records([source[i] for i in range(len(source))], expected)
    aus = (4, 99, 12)
    source = open_prepared(data_dir, "train", dataset="manifest", aus=aus, source_index=2)
    expected = _expected(manual, "train", aus=aus, source_index=2)
    _assert_same_records([source[i] for i in range(len(source))], expected)
    _assert_same_records([pickle.loads(pickle.dumps(source))[i] for i in range(3)], expected)
    for i, record in enumerate(expected):
        labels = source.labels(i)
        _assert_same_records([{**labels, "image": record["image"]}], [record])
    np.testing.assert_array_equal(source.expression_labels, [4, -1, 6])
    assert source.info().line().endswith("skipped 1 record(s): 1 unreadable image (first: "
                                         f"{manual / 'img' / 'c.png'})")


def test_prepare_prints_the_exact_counts(prepared):
    manual, data_dir, lines = prepared
    directory = faces.prepared_dir(data_dir, "manifest", {})
    assert lines[-5:] == [f"manifest: prepared in {directory}", *COUNT_LINES]
    metadata = faces.read_metadata(directory)
    assert metadata["records"] == {"train": 3, "validation": 2, "test": 2}
    assert metadata["skipped"] == {"train": {"unreadable image": 1}, "validation": {},
                                   "test": {"unreadable label": 1}}
    assert metadata["first_skipped"]["train"]["unreadable image"][0].startswith(
        f"{manual / 'img' / 'c.png'}: unreadable image")
    assert metadata["manual_dir"] == str(manual)


def test_a_second_prepare_writes_nothing(prepared):
    manual, data_dir, _ = prepared
    directory = faces.prepared_dir(data_dir, "manifest", {})
    before = _files(data_dir)
    for options in ([], ["seed=0", "margin=0.2"]):  # the defaults, left out or given
        status, lines = _run("manifest", manual, data_dir, options, False)
        assert status == 0
        assert lines == [f"manifest: already prepared in {directory}; nothing written",
                         *COUNT_LINES]
    assert _files(data_dir) == before


def test_other_options_go_to_another_folder(prepared):
    manual, data_dir, _ = prepared
    status, lines = _run("manifest", manual, data_dir, ["margin=0.5"], False)
    assert status == 0
    default = faces.prepared_dir(data_dir, "manifest", {})
    wider = faces.prepared_dir(data_dir, "manifest", {"margin": 0.5})
    assert wider != default and wider.parent.name.startswith("margin-0.5-")
    assert lines[-5] == f"manifest: prepared in {wider}"
    source = open_prepared(data_dir, "train", dataset="manifest", margin=0.5)
    expected = _expected(manual, "train", margin=0.5)
    _assert_same_records([source[i] for i in range(len(source))], expected)
    narrow = open_prepared(data_dir, "train", dataset="manifest")
    assert source[2]["key"] == "img/d.png" and source[2]["image"].shape == (20, 20, 3)
    assert narrow[2]["image"].shape == (14, 14, 3)


def test_raw_preparation_holds_the_faces_resized_as_the_pipeline_would(prepared):
    manual, data_dir, _ = prepared
    status, lines = _run("manifest", manual, data_dir, ["image_size=6"], False)
    assert status == 0
    raw = faces.prepared_dir(data_dir, "manifest", {"image_size": 6})
    assert raw.parent.name.startswith("image_size-6-") and lines[-5] == (
        f"manifest: prepared in {raw}")
    resize = transforms.ResizeImage(6)
    for split in faces.SPLITS:
        source = open_prepared(data_dir, split, dataset="manifest", image_size=6)
        expected = [resize.map(r) for r in _expected(manual, split)]
        _assert_same_records([source[i] for i in range(len(source))], expected)
    # Stored as the raw pixels, not PNG: 6 * 6 * 3 bytes of each image are in the record file.
    image = expected[0]["image"]
    assert image.shape == (6, 6, 3) and image.dtype == np.uint8
    stored = b"".join(p.read_bytes() for p in raw.glob("*test.array_record*"))
    assert image.tobytes() in stored
    png = faces.prepared_dir(data_dir, "manifest", {})
    assert image.tobytes() not in b"".join(p.read_bytes() for p in png.glob("*.array_record*"))


def test_raw_preparation_is_stored_uncompressed_and_read_in_batches(tmp_path):
    manual = _dataset(tmp_path / "manual")
    data_dir = tmp_path / "prepared"
    assert _run("manifest", manual, data_dir, ["image_size=6"], False)[0] == 0
    raw = faces.prepared_dir(data_dir, "manifest", {"image_size": 6})
    shards = faces.record_files(raw)
    assert len(shards) == 3 and not any(faces.is_compressed(p) for p in shards)
    # An example's 108 pixel bytes are stored as they are, whole in the file.
    source = open_prepared(data_dir, "train", dataset="manifest", image_size=6)
    records = [source[i] for i in range(len(source))]
    assert records[0]["image"].tobytes() in b"".join(p.read_bytes() for p in shards)
    # The batched read (grain's `_getitems`) gives the records one read gives, indices past
    # the end wrapping as they do; each label has the dtype `schema.make_record` gives it.
    indices = [2, 0, 2, 1 + len(source)]
    _assert_same_records(source._getitems(indices), [records[i % len(source)] for i in indices])
    # Both read what TFDS's own decoder reads from the records.
    _assert_same_records(records, [source.decoded(i) for i in range(len(source))])


def test_a_compressed_raw_preparation_reads_the_same_and_is_rewritten_uncompressed(tmp_path):
    manual = _dataset(tmp_path / "manual")
    data_dir = tmp_path / "prepared"
    _run("manifest", manual, data_dir, ["image_size=6"], False)
    raw = faces.prepared_dir(data_dir, "manifest", {"image_size": 6})
    before = {split: [r for r in _read_all(data_dir, split)] for split in faces.SPLITS}
    for path in faces.record_files(raw):  # as TFDS writes them (zstd), before this change
        faces.rewrite_records(path, faces.TFDS_WRITES)
    assert all(faces.is_compressed(p) for p in faces.record_files(raw))
    for split in faces.SPLITS:
        _assert_same_records(_read_all(data_dir, split), before[split])
    # Preparing the same options again rewrites the files, and only the files, uncompressed.
    labels = {p.name: p.read_bytes() for p in raw.iterdir() if "array_record" not in p.name}
    status, lines = _run("manifest", manual, data_dir, ["image_size=6"], False)
    assert status == 0 and lines[0] == (f"manifest: already prepared in {raw}; its 3 record "
                                        f"file(s) rewritten uncompressed (read faster)")
    assert _run("manifest", manual, data_dir, ["image_size=6"], False)[1][0] == (
        f"manifest: already prepared in {raw}; nothing written")
    assert not any(faces.is_compressed(p) for p in faces.record_files(raw))
    assert labels == {p.name: p.read_bytes() for p in raw.iterdir()
                      if "array_record" not in p.name}
    assert faces.store_uncompressed(raw) == 0
    for split in faces.SPLITS:
        _assert_same_records(_read_all(data_dir, split), before[split])


def test_a_raw_record_of_another_size_is_an_error_naming_the_folder(tmp_path):
    manual = _dataset(tmp_path / "manual")
    data_dir = tmp_path / "prepared"
    _run("manifest", manual, data_dir, ["image_size=6"], False)
    source = open_prepared(data_dir, "test", dataset="manifest", image_size=6)
    source._size = 5  # what a record of a 5 px face in a 6 px preparation reads as
    with pytest.raises(DatasetError, match=re.escape(
            f"{source.root}: record 1 of split 'test' holds an image of 108 bytes, not the "
            f"5x5x3 uint8 bytes of this preparation; prepare it again")):
        source[1]


def test_a_damaged_record_file_is_one_error_naming_it_in_reading_and_in_preparing(tmp_path):
    manual = _dataset(tmp_path / "manual")
    data_dir = tmp_path / "prepared"
    _run("manifest", manual, data_dir, ["image_size=6"], False)
    raw = faces.prepared_dir(data_dir, "manifest", {"image_size": 6})
    shard = next(p for p in faces.record_files(raw) if "-test." in p.name)
    shard.write_bytes(shard.read_bytes()[:-200])   # truncated: its footer is gone
    source = open_prepared(data_dir, "train", dataset="manifest", image_size=6)
    source[0]  # the other splits' files are whole
    with pytest.raises(DatasetError, match=re.escape(f"{raw}: record 0 of split 'test' cannot "
                                                     f"be read: ")) as error:
        open_prepared(data_dir, "test", dataset="manifest", image_size=6)[0]
    assert str(error.value).endswith(f"; the record files are damaged: delete {raw} and "
                                     f"prepare it again")
    with pytest.raises(DatasetError, match=re.escape(f"{shard}: cannot be read: ")) as error:
        _run("manifest", manual, data_dir, ["image_size=6"], False)
    assert str(error.value).endswith(f"; the preparation is damaged: delete {raw} and prepare "
                                     f"it again")


def _read_all(data_dir, split):
    source = open_prepared(data_dir, split, dataset="manifest", image_size=6)
    return [source[i] for i in range(len(source))]


def test_config_names_follow_the_options():
    name = faces.config_name
    assert name("manifest", {}) == name("manifest", {"seed": 0, "margin": 0.2})
    assert name("manifest", {"margin": 1}) == name("manifest", {"margin": 1.0})
    names = {name("manifest", {}), name("manifest", {"seed": 1}), name("manifest", {"seed": 2}),
             name("manifest", {"margin": 0.3}), name("rafdb", {"images": "original"})}
    assert len(names) == 5
    assert all(re.fullmatch(r"[\w+\-.]+", n) for n in names)
    assert name("manifest", {}).startswith("default-")
    # The names of preparations written before image_size existed (it is hashed only when set).
    assert name("manifest", {}) == name("manifest", {"image_size": 0}) == "default-dceefae9ce"
    assert name("manifest", {"margin": 0.3}) == "margin-0.3-c630513ee3"
    assert name("manifest", {"image_size": 64}).startswith("image_size-64-")
    assert name("rafdb", {"images": "original"}).startswith("images-original-")
    with pytest.raises(DatasetError, match="unknown dataset 'nope'"):
        faces.prepared_dir("/data", "nope", {})


def test_a_missing_preparation_names_the_folder_and_the_command(prepared):
    _, data_dir, _ = prepared
    directory = faces.prepared_dir(data_dir, "manifest", {"seed": 3})
    with pytest.raises(DatasetError) as error:
        open_prepared(data_dir, "train", dataset="manifest", seed=3)
    message = str(error.value)
    assert f"no preparation in {directory}" in message and "\n" not in message
    assert message.endswith(f"fbnet prepare --dataset manifest --manual_dir '<the manifest "
                            f"folder>' --data_dir {data_dir} --option seed=3")
    assert faces.config_name("manifest", {}) in message  # what is prepared there
    with pytest.raises(DatasetError, match="no split 'all'"):
        open_prepared(data_dir, "all", dataset="manifest")


def test_strict_stops_at_the_corrupt_image(tmp_path):
    manual = _dataset(tmp_path / "manual", [row for row in ROWS if row[0] != "h.png"])
    with pytest.raises(BadRecordError, match=r"c\.png: unreadable image .*strict"):
        _run("manifest", manual, tmp_path / "data", [], True)
    assert not faces.prepared_dir(tmp_path / "data", "manifest", {}).exists()
    assert not any("incomplete" in p.name for p in (tmp_path / "data").rglob("*"))
    # Every split's labels are read before any image: the bad label (h.png, test) stops first.
    manual = _dataset(tmp_path / "labels")
    with pytest.raises(BadRecordError, match=r"manifest.csv:9: unreadable label .*strict"):
        _run("manifest", manual, tmp_path / "data", [], True)
    assert not faces.prepared_dir(tmp_path / "data", "manifest", {}).exists()


def test_bad_options_are_one_line_errors(tmp_path):
    manual = _dataset(tmp_path / "manual")
    for options, message in [
            (["colour=red"], "manifest: unknown option(s) colour; its options: "
                             "validation_fraction (default 0.1), test_fraction (default 0.1), "
                             "seed (default 0), margin (default 0.2), image_size (default 0)"),
            (["seed"], "--option expects KEY=VALUE, got 'seed'; manifest's options: "),
            (["seed=1", "seed=2"], "--option seed is given twice"),
            (["margin=-1"], "manifest: option margin must be a number >= 0, got -1.0"),
            (["image_size=1.5"], "manifest: option image_size must be an int >= 0 (0: faces as "
                                 "served, stored as PNG), got 1.5")]:
        with pytest.raises(DatasetError) as error:
            _run("manifest", manual, tmp_path / "data", options, False)
        assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "data").exists()
    assert prepare.parse_options("rafdb", ["images=original", "seed=3", "validation_fraction=.2"]
                                 ) == {"images": "original", "seed": 3, "validation_fraction": 0.2}
    for value in ("va", "3", 3, 0.5, True, None, "a b"):
        assert prepare.parse_option_value(prepare.option_text(value)) == value


def test_a_split_the_hash_leaves_empty_is_not_written_and_says_why(tmp_path):
    # Without the split column the seeded hash puts e.jpg in test, the rest in train and no
    # image in validation (as with a 10-image ExpW or a small CK+ folder).
    manual = _dataset(tmp_path / "manual", split_column=False)
    data_dir = tmp_path / "data"
    status, lines = _run("manifest", manual, data_dir, [], False)
    assert status == 0
    directory = faces.prepared_dir(data_dir, "manifest", {})
    why = ("the split put none of the dataset's 7 prepared record(s) in validation (train 6, "
           "test 1; split options validation_fraction=0.1, seed=0)")
    summary = [
        COUNT_LINES[0],
        "  train: 6 record(s) written, 2 skipped (1 unreadable image; 1 unreadable label)",
        f"  validation: 0 record(s) written, 0 skipped; empty: {why}",
        "  test: 1 record(s) written, 0 skipped",
        "  validation is empty: a run cannot train or evaluate on it (reading it is an error); "
        "other split options may fill it"]
    assert lines[-6:] == [f"manifest: prepared in {directory}", *summary]
    assert faces.read_metadata(directory)["records"] == {"train": 6, "validation": 0, "test": 1}
    assert not [p.name for p in directory.iterdir() if "validation" in p.name]
    for split in ("train", "test"):
        source = open_prepared(data_dir, split, dataset="manifest")
        _assert_same_records([source[i] for i in range(len(source))], _expected(manual, split))
    with pytest.raises(DatasetError) as error:
        get_source("prepared", data_dir, "validation", dataset="manifest")
    assert str(error.value) == (
        f"manifest: split 'validation' of the preparation in {directory} is empty: {why}. A run "
        f"cannot train or evaluate on it; prepare manifest again with other split options to "
        f"fill it, or leave this split out")
    status, lines = _run("manifest", manual, data_dir, [], False)
    assert status == 0 and lines == [
        f"manifest: already prepared in {directory}; nothing written", *summary]
    # Another seed fills validation, and leaves test empty instead.
    status, lines = _run("manifest", manual, data_dir, ["seed=1"], False)
    assert status == 0 and lines[-2:] == [
        "  test: 0 record(s) written, 0 skipped; empty: the split put none of the dataset's 7 "
        "prepared record(s) in test (train 4, validation 3; split options test_fraction=0.1, "
        "seed=1)",
        "  test is empty: a run cannot train or evaluate on it (reading it is an error); other "
        "split options may fill it"]
    assert len(open_prepared(data_dir, "validation", dataset="manifest", seed=1)) == 3


def test_an_empty_split_whose_rows_were_skipped_says_so(tmp_path):
    bad = ("x.png", (8, 8, 3), "9", "", "", "", "", "validation", "")
    rows = [row for row in ROWS if row[7] != "validation"] + [bad]
    status, lines = _run("manifest", _dataset(tmp_path / "manual", rows), tmp_path / "data",
                         [], False)
    assert status == 0
    assert lines[-3:] == [
        "  validation: 0 record(s) written, 1 skipped (1 unreadable label); empty: no usable "
        "record is in validation (the rows read for it were skipped or left out, as counted, or "
        "the split put none there); the other splits hold 5 (train 3, test 2; split options "
        "validation_fraction=0.1, seed=0)",
        COUNT_LINES[3],
        "  validation is empty: a run cannot train or evaluate on it (reading it is an error); "
        "other split options may fill it"]


def test_a_dataset_with_no_usable_record_or_no_readable_image_is_not_prepared(tmp_path):
    bad_label = [row for row in ROWS if row[0] == "h.png"]
    with pytest.raises(DatasetError) as error:
        _run("manifest", _dataset(tmp_path / "labels", bad_label), tmp_path / "data", [], False)
    assert str(error.value).startswith(
        f"manifest: no usable record in any split under {tmp_path / 'labels'} (manifest[train]: "
        f"no record skipped; manifest[validation]: no record skipped; manifest[test]: skipped 1 "
        f"record(s): 1 unreadable label (first: ")
    corrupt = [row for row in ROWS if row[0] in ("c.png", "g.png")]  # train: c.png alone
    with pytest.raises(DatasetError) as error:
        _run("manifest", _dataset(tmp_path / "images", corrupt), tmp_path / "data", [], False)
    assert str(error.value).startswith(
        "manifest: none of the 1 images of split 'train' could be read (manifest[train]: skipped "
        f"1 record(s): 1 unreadable image (first: {tmp_path / 'images' / 'img' / 'c.png'})")
    assert not (tmp_path / "data" / "manifest_faces").exists() or not any(
        faces.is_prepared(p) for p in (tmp_path / "data" / "manifest_faces").glob("*/*"))


def test_empty_reasons_name_the_options_that_split_the_dataset():
    def reason(split, options, skipped=None):
        records = {"train": 5, "validation": 2, "test": 1, split: 0}
        return faces.empty_reason({"records": records, "options": options,
                                   "skipped": {split: skipped or {}}}, split)
    assert reason("test", {"fold": 1, "validation_fraction": 0.1, "seed": 0}) == (
        "the split put none of the dataset's 7 prepared record(s) in test (train 5, "
        "validation 2; split options fold=1)")
    assert reason("validation", {"fold": 2, "validation_fraction": 0.1, "test_fraction": 0.1,
                                 "seed": 3}) == (
        "the split put none of the dataset's 6 prepared record(s) in validation (train 5, "
        "test 1; split options fold=2, validation_fraction=0.1, seed=3)")
    assert reason("test", {"images": "aligned", "validation_fraction": 0.1, "seed": 0}).endswith(
        "(train 5, validation 2; the dataset's own test set)")
    assert reason("validation", {"vote": "majority"}).endswith(
        "(train 5, test 1; the dataset's own split)")
    assert reason("train", {"validation_fraction": 0.1, "test_fraction": 0.2, "seed": 0},
                  {"no label": 2}) == (
        "no usable record is in train (the rows read for it were skipped or left out, as "
        "counted, or the split put none there); the other splits hold 3 (validation 2, test 1; "
        "split options validation_fraction=0.1, test_fraction=0.2, seed=0)")
