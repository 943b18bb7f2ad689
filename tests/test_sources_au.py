"""The AU sources (EmotioNet, DISFA, BP4D, BP4D+) on tiny fixtures in their real formats."""

import collections
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines.sources import base, bp4d, disfa, emotionet, get_source
from fbnet_jax.core import taxonomy


def _image(path: Path, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (200, 40, 10)).save(path)


def _write(path: Path, lines, newline: str = "\n", last_newline: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((newline.join(lines) + (newline if last_newline else "")).encode())


def _read(read, root: Path, split: str = "all", strict: bool = False, **options) -> base.Table:
    table = base.Table(base.Skips("test", strict=strict))
    read(root, split, table, **options)
    return table


def _au(labels: dict) -> list:
    return base.au_vector(labels).tolist()


def _rows(table: base.Table, root: Path | None = None) -> list:
    """(key, au list, group) of every row; checks that no other label is set, and (with `root`)
    that each path is root/key."""
    columns = table.columns()
    assert (columns["expression"] == -1).all() and (columns["compound"] == -1).all()
    assert np.isnan(columns["va"]).all() and np.isnan(columns["box"]).all()
    assert not columns["landmarks"]
    if root is not None:
        assert [Path(p) for p in columns["path"]] == [root / k for k in columns["key"]]
    return [(k, a.tolist(), g) for k, a, g in zip(columns["key"], columns["au"],
                                                   columns["group"])]


def _check_splits(read, root: Path, **options) -> dict:
    """Keys of each split: disjoint, and together the keys of "all"."""
    keys = {s: set(_read(read, root, s, **options).columns()["key"]) for s in base.SPLITS}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert keys["train"] | keys["validation"] | keys["test"] == keys["all"]
    return keys


# --------------------------------------------------------------------------------- EmotioNet

AWS = "http://cbcsl.ece.ohio-state.edu/EmotioNet/"


def _list_line(url: str, values: dict, n: int = 60) -> str:
    """An original EmotioNet list line: url, orig_url, AU1..AU60 (0 unless given)."""
    return "\t".join([url, "http://orig.example.com/pic.jpg"]
                     + [str(values.get(au, 0)) for au in range(1, n + 1)])


MANUAL_AUS = (1, 2, 4, 5, 6, 9, 12, 17, 20, 25, 26, 43)


def _manual_line(url: str, values: dict) -> str:
    return ",".join([f"'{url}'", "'http://orig.example.com/pic.jpg'"]
                    + [str(values.get(au, 0)) for au in MANUAL_AUS])


@pytest.fixture
def emotionet_root(tmp_path):
    root = tmp_path / "EmotioNet"
    _image(root / "images/N_0000000001/N_0000000001_00001.jpg")
    _image(root / "images/N_0000000002_00001.jpg")
    _image(root / "images/more/N_0000000003_00002.png")
    _image(root / "images/a/dup.jpg")
    _image(root / "images/b/dup.jpg")
    lists = root / "emotioNet_challenge_files_server_challenge_1.2_aws"
    _write(lists / "dataFile_1001.txt", [
        _list_line(AWS + "N_0000000001/N_0000000001_00001.jpg", {1: 1, 2: 999, 12: 1, 43: 1}),
        _list_line("'" + AWS + "N_0000000002/N_0000000002_00001.jpg'", {4: 1, 60: 999}),
        _list_line(AWS + "N_0000000004/N_0000000004_00001.jpg",
                   {**{au: 999 for au in taxonomy.AUS}, 43: 1}),        # no AU of the 17
        _list_line(AWS + "x/N_0000000005_00001.jpg", {5: 2}),            # value 2
        _list_line(AWS + "x/N_0000000006_00001.jpg", {}, n=61),          # 63 fields
        "",
        _list_line(AWS + "x/N_0000000007_00001.jpg", {9: "nan"}),        # NaN
        _list_line(AWS + "x/N_0000000008_00001.jpg", {1: 1}),            # no image
        _list_line(AWS + "N_0000000001/N_0000000001_00001.jpg", {1: 0}),  # same image again
        _list_line(AWS + "x/dup.jpg", {1: 1}),                           # two files dup.jpg
    ], newline="\r\n", last_newline=False)
    _write(lists / "dataFile_1002.txt", [
        _list_line(AWS + "N_0000000003/N_0000000003_00002.png", {25: 1, 26: 1, 12: 999}),
    ])
    header = ("URL,URL orig,'AU 1',\"AU 2\",AU 4,AU5,' AU 6 ',\"'AU 9'\",AU12,AU17,AU20,AU25,"
              "AU26,AU43")
    _write(root / "EmotioNet_FACS_aws_2020_24600.csv", [
        header,
        _manual_line(AWS + "N_0000000002/N_0000000002_00001.jpg", {1: 1, 9: 999, 26: 1}),
        _manual_line(AWS + "N_0000000003/N_0000000003_00002.png", {5: 1, 6: 1, 20: 1}),
        _manual_line(AWS + "N_0000000009/N_0000000009_00001.jpg", {2: 1}),  # no image
        _manual_line(AWS + "N_0000000001/N_0000000001_00001.jpg", {1: 3}),  # value 3
        _manual_line(AWS + "N_0000000001/N_0000000001_00001.jpg", {}) + ",0",  # extra field
        _manual_line(AWS + "N_0000000001/N_0000000001_00001.jpg",
                     {au: 999 for au in MANUAL_AUS}),                      # nothing coded
    ], newline="\r\n")
    return root


def _manual_au(labels: dict) -> list:
    """The AU vector of a row of the CSV: its AU columns 0 unless given, the others -1."""
    return _au({**{au: 0 for au in MANUAL_AUS}, **labels})


def test_emotionet_lists(emotionet_root):
    table = _read(emotionet.read, emotionet_root, labels="lists")
    root = emotionet_root
    assert _rows(table, root) == [
        ("images/N_0000000001/N_0000000001_00001.jpg",
         _au({**{au: 0 for au in taxonomy.AUS}, 1: 1, 2: -1, 12: 1}), ""),
        ("images/N_0000000002_00001.jpg", _au({**{au: 0 for au in taxonomy.AUS}, 4: 1}), ""),
        ("images/more/N_0000000003_00002.png",
         _au({**{au: 0 for au in taxonomy.AUS}, 25: 1, 26: 1, 12: -1}), ""),
    ]
    assert table.skips.counts == collections.Counter({
        "unreadable label line": 3, "no AU label": 1, "image file not found": 1,
        "duplicated key": 1, "ambiguous image file name": 1})
    first = table.skips.first
    lists = root / "emotioNet_challenge_files_server_challenge_1.2_aws"
    assert first["no AU label"][0].startswith(f"{lists / 'dataFile_1001.txt'}:3:")
    assert [t.split(": ")[0] for t in first["unreadable label line"]] == [
        f"{lists / 'dataFile_1001.txt'}:{n}" for n in (4, 5, 7)]
    assert "63 fields, expected 62" in first["unreadable label line"][1]
    assert "N_0000000008_00001.jpg" in first["image file not found"][0]
    assert str(root / "images/a/dup.jpg") in first["ambiguous image file name"][0]


def test_emotionet_manual_csv_is_the_default(emotionet_root):
    table = _read(emotionet.read, emotionet_root)
    assert _rows(table, emotionet_root) == [
        ("images/N_0000000002_00001.jpg", _manual_au({1: 1, 9: -1, 26: 1}), ""),
        ("images/more/N_0000000003_00002.png", _manual_au({5: 1, 6: 1, 20: 1}), ""),
    ]
    assert table.skips.counts == collections.Counter({
        "image file not found": 1, "unreadable label line": 2, "no AU label": 1})
    csv_file = emotionet_root / "EmotioNet_FACS_aws_2020_24600.csv"
    assert [t.split(": ")[0] for t in table.skips.first["unreadable label line"]] == [
        f"{csv_file}:5", f"{csv_file}:6"]


LISTS_KEYS = ["images/N_0000000001/N_0000000001_00001.jpg", "images/N_0000000002_00001.jpg",
              "images/more/N_0000000003_00002.png"]


def test_emotionet_auto_says_when_it_falls_back_to_the_automatic_lists(emotionet_root, caplog):
    caplog.set_level(logging.WARNING, logger="fbnet.data")
    for labels in ("auto", "lists", "manual"):  # with the manual CSV there: no caveat
        assert not _read(emotionet.read, emotionet_root, labels=labels).skips.noted
    assert not [r for r in caplog.records if "automatically annotated" in r.getMessage()]
    (emotionet_root / "EmotioNet_FACS_aws_2020_24600.csv").unlink()
    table = _read(emotionet.read, emotionet_root)
    assert [k for k, _, _ in _rows(table)] == LISTS_KEYS
    assert table.skips.noted == collections.Counter({emotionet.AUTOMATIC: 3})
    assert emotionet.AUTOMATIC == ("automatically annotated AU labels (labels=auto found no "
                                   "manual CSV)")
    assert table.skips.summary().endswith(
        "; noted: 3 automatically annotated AU labels (labels=auto found no manual CSV)")
    lists = emotionet_root / "emotioNet_challenge_files_server_challenge_1.2_aws"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "automatically annotated" in r.getMessage()]
    assert warnings == [
        f"emotionet[all]: found no manual label CSV (EmotioNet_FACS_aws_2020_24600.csv) under "
        f"{emotionet_root}, so reading the automatically annotated lists in {lists} (2 files) "
        f"instead: their AU labels come from EmotioNet's detector, not from FACS coders. Give "
        f"labels='lists' to read them on purpose, or labels='manual' to require the CSV."]
    # Chosen on purpose: the same rows, neither warned about nor noted.
    caplog.clear()
    chosen = _read(emotionet.read, emotionet_root, labels="lists")
    assert [k for k, _, _ in _rows(chosen)] == LISTS_KEYS and not chosen.skips.noted
    assert not [r for r in caplog.records if "automatically annotated" in r.getMessage()]


def test_prepare_reports_the_automatic_emotionet_labels(emotionet_root, tmp_path, capsys):
    from data_pipelines.sources.prepared import open_prepared  # pylint: disable=g-import-not-at-top
    from data_pipelines.tfds_builders import prepare  # pylint: disable=g-import-not-at-top
    (emotionet_root / "EmotioNet_FACS_aws_2020_24600.csv").unlink()
    # Seed 0 puts the three labelled images in train, validation and test, one each.
    options = ["seed=0", "validation_fraction=0.3", "test_fraction=0.3"]
    assert prepare.run_command("emotionet", emotionet_root, tmp_path, options, False) == 0
    noted = "; noted: 1 automatically annotated AU labels (labels=auto found no manual CSV)"
    assert capsys.readouterr().out.splitlines()[-3:] == [
        "  train: 1 record(s) written, 4 skipped (2 unreadable label line; 1 ambiguous image "
        "file name; 1 duplicated key)" + noted,
        "  validation: 1 record(s) written, 3 skipped (1 image file not found; 1 no AU label; "
        "1 unreadable label line)" + noted,
        "  test: 1 record(s) written, 2 skipped (2 unreadable label line)" + noted]
    source = open_prepared(tmp_path, "test", dataset="emotionet", seed=0,
                           validation_fraction=0.3, test_fraction=0.3)
    assert [source[0]["key"]] == ["images/more/N_0000000003_00002.png"]
    assert source.skips.noted == collections.Counter({emotionet.AUTOMATIC: 1})


def test_emotionet_glob_option_and_images_dir(emotionet_root):
    (emotionet_root / "images/b/dup.jpg").unlink()
    table = _read(emotionet.read, emotionet_root, labels="emotioNet_*/dataFile_1001.txt",
                  images_dir="images")
    rows = _rows(table, emotionet_root / "images")
    assert [k for k, _, _ in rows] == ["N_0000000001/N_0000000001_00001.jpg",
                                       "N_0000000002_00001.jpg", "a/dup.jpg"]
    assert "ambiguous image file name" not in table.skips.counts


def test_emotionet_splits_are_by_image(emotionet_root):
    for seed in range(50):
        keys = _check_splits(emotionet.read, emotionet_root, labels="lists", seed=seed,
                             validation_fraction=0.3, test_fraction=0.3)
        if all(keys[s] for s in ("train", "validation", "test")):
            break
    else:
        pytest.fail("no seed puts an image in each split")
    for split in ("train", "validation", "test"):
        for key in keys[split]:
            assert base.subject_split(Path(key).name, seed, 0.3, 0.3) == split


def test_emotionet_errors(emotionet_root, tmp_path):
    with pytest.raises(base.DatasetError, match="is not a folder"):
        _read(emotionet.read, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(base.DatasetError) as error:
        _read(emotionet.read, tmp_path / "empty")
    assert "EmotioNet_FACS_aws_2020_24600.csv" in str(error.value)
    assert "dataFile_*.txt" in str(error.value)
    with pytest.raises(base.DatasetError, match="dataFile_"):
        _read(emotionet.read, tmp_path / "empty", labels="lists")
    with pytest.raises(base.DatasetError, match="no label file matches"):
        _read(emotionet.read, emotionet_root, labels="nothing/*.txt")
    with pytest.raises(base.DatasetError, match="image folder"):
        _read(emotionet.read, emotionet_root, images_dir="pictures")
    _write(tmp_path / "bad/EmotioNet_FACS_aws_2020_24600.csv", ["link,AU 1", "'x.jpg',1"])
    with pytest.raises(base.DatasetError, match="URL column"):
        _read(emotionet.read, tmp_path / "bad")
    with pytest.raises(base.BadRecordError, match=r"dataFile_1001.txt:3: no AU label"):
        _read(emotionet.read, emotionet_root, labels="lists", strict=True)


# ------------------------------------------------------------------------------------- DISFA


def _intensity(au: int, frame: int) -> int:
    return (au + frame) % 6


def _write_disfa(root: Path, subjects: dict, naming: str = "frames/{s}/{i}.jpg") -> None:
    """Label files for `subjects` ({subject: frames}), every AU with `_intensity`, and the
    frame images named by `naming`."""
    for subject, frames in subjects.items():
        for au in disfa.AUS:
            _write(root / "ActionUnit_Labels" / subject / f"{subject}_au{au}.txt",
                   [f"{f},{_intensity(au, f)}" for f in frames],
                   newline="\r\n" if au % 2 else "\n", last_newline=au != 26)
        for f in frames:
            _image(root / naming.format(s=subject, i=f - 1, n=f))


def _disfa_au(frame: int, threshold: int = 2) -> list:
    return _au({au: int(_intensity(au, frame) >= threshold) for au in disfa.AUS})


@pytest.fixture
def disfa_root(tmp_path):
    root = tmp_path / "DISFA"
    _write_disfa(root, {"SN001": [1, 2, 3], "SN013": [1, 2, 3], "SN003": [1, 2, 3, 4, 5, 6]})
    (root / "frames/SN013/2.jpg").unlink()  # frame 3 of SN013 was not extracted
    labels = root / "ActionUnit_Labels/SN003"
    edits = {4: {2: "2,7"}, 5: {3: "3,1.5"}, 9: {1: "1,2\n1,2"}, 12: {5: "5,1,2"}}
    for au, lines in edits.items():
        path = labels / f"SN003_au{au}.txt"
        text = [lines.get(f, f"{f},{_intensity(au, f)}") for f in range(1, 7)]
        _write(path, text)
    _write(labels / "SN003_au6.txt", [f"{f},{_intensity(6, f)}" for f in (1, 2, 3, 5, 6)]
           + ["x,1"])
    return root


def test_disfa_labels_and_skips(disfa_root):
    table = _read(disfa.read, disfa_root)
    expected = ([(f"SN001/{f}", _disfa_au(f), "SN001") for f in (1, 2, 3)]
                + [("SN003/6", _disfa_au(6), "SN003")]
                + [(f"SN013/{f}", _disfa_au(f), "SN013") for f in (1, 2)])
    assert _rows(table) == expected
    # Spelled out for one frame: intensity (AU + 1) % 6 >= 2.
    assert expected[0][1] == _au({1: 1, 2: 1, 4: 1, 5: 0, 6: 0, 9: 1, 12: 0, 15: 1, 17: 0,
                                  20: 1, 25: 1, 26: 1})
    paths = table.columns()["path"]
    assert [Path(p).relative_to(disfa_root).as_posix() for p in paths] == [
        "frames/SN001/0.jpg", "frames/SN001/1.jpg", "frames/SN001/2.jpg", "frames/SN003/5.jpg",
        "frames/SN013/0.jpg", "frames/SN013/1.jpg"]
    labels = disfa_root / "ActionUnit_Labels/SN003"
    assert table.skips.counts == collections.Counter({
        "frame listed twice in an AU file": 1, "intensity not an integer 0..5": 2,
        "frame missing from an AU file": 1, "wrong number of fields": 1,
        "unreadable frame number": 1, "image file not found": 1})
    first = {reason: places[0] for reason, places in table.skips.first.items()}
    assert first["frame listed twice in an AU file"].startswith(f"{labels / 'SN003_au9.txt'}:2:")
    assert first["unreadable frame number"].startswith(f"{labels / 'SN003_au6.txt'}:6:")
    assert first["frame missing from an AU file"].startswith(
        f"{labels / 'SN003_au6.txt'}: frame missing from an AU file (frame 4)")
    assert first["wrong number of fields"].startswith(f"{labels / 'SN003_au12.txt'}:5:")
    assert [t.split(": ")[0] for t in table.skips.first["intensity not an integer 0..5"]] == [
        f"{labels / 'SN003_au4.txt'}:2", f"{labels / 'SN003_au5.txt'}:3"]


def test_disfa_threshold_and_get_source(disfa_root):
    table = _read(disfa.read, disfa_root, threshold=3)
    assert _rows(table)[0] == ("SN001/1", _disfa_au(1, threshold=3), "SN001")
    assert _disfa_au(1, threshold=3) != _disfa_au(1)
    source = get_source("disfa", disfa_root, "all", threshold=3)
    record = source[0]
    assert record["key"] == "SN001/1" and record["image"].shape == (8, 8, 3)
    assert record["au"].tolist() == _disfa_au(1, threshold=3)
    with pytest.raises(base.DatasetError, match="threshold"):
        _read(disfa.read, disfa_root, threshold=6)


@pytest.mark.parametrize("naming,option", [
    ("img/{s}/{n:05d}.png", {}), ("img/{s}/{n}.jpg", {}), ("img/{s}/{i:04d}.jpg", {}),
    ("img/{s}/frame{n}.jpg", {"frame_naming": "frame{n}.jpg"})])
def test_disfa_frame_namings(tmp_path, naming, option):
    _write_disfa(tmp_path, {"SN002": [1, 2]}, naming=naming)
    table = _read(disfa.read, tmp_path, frames_dir="img", **option)
    assert [k for k, _, _ in _rows(table)] == ["SN002/1", "SN002/2"]
    assert [Path(p).relative_to(tmp_path).as_posix() for p in table.columns()["path"]] == [
        naming.format(s="SN002", i=0, n=1), naming.format(s="SN002", i=1, n=2)]
    assert not table.skips.total


@pytest.mark.parametrize("naming, missing, expected", [
    ("img/{s}/{i}.jpg", None, "{i}.jpg"),      # 0..2 for labels 1..3
    ("img/{s}/{n}.jpg", None, "{n}.jpg"),      # 1..3
    ("img/{s}/{i}.jpg", "0.jpg", None),        # 1, 2: numbered from 0 without its first frame?
    ("img/{s}/{n}.jpg", "3.jpg", None),        # 1, 2: numbered from 1 without its last frame?
])
def test_disfa_frame_numbering_is_decided_from_both_ends(tmp_path, naming, missing, expected):
    _write_disfa(tmp_path, {"SN002": [1, 2, 3]}, naming=naming)
    if missing:
        (tmp_path / "img" / "SN002" / missing).unlink()
    if expected:
        table = _read(disfa.read, tmp_path, frames_dir="img")
        assert [Path(p).name for p in table.columns()["path"]] == [
            expected.format(i=f - 1, n=f) for f in (1, 2, 3)]
    else:
        with pytest.raises(base.DatasetError, match=r"cannot tell whether the frames in .*SN002 "
                                                    r"are numbered from 0 or 1.*set frame_naming"):
            _read(disfa.read, tmp_path, frames_dir="img")


def test_disfa_layout_errors(disfa_root, tmp_path):
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(base.DatasetError, match="found no AU label folder.*ActionUnit_Labels"):
        _read(disfa.read, tmp_path / "nowhere")
    with pytest.raises(base.DatasetError, match="no frame folder .*img; DISFA ships videos"):
        _read(disfa.read, disfa_root, frames_dir="img")
    for frame in (disfa_root / "frames/SN001").iterdir():
        frame.unlink()
    with pytest.raises(base.DatasetError, match=r"no first frame in .*SN001; looked for 0\.jpg, "
                                                r"0\.png, 1\.jpg, 1\.png, 0000\.jpg"):
        _read(disfa.read, disfa_root)
    with pytest.raises(base.DatasetError, match="not a format string"):
        _read(disfa.read, disfa_root, frame_naming="{x}.jpg")
    with pytest.raises(base.DatasetError, match="holds no subject folder; looked for"):
        _read(disfa.read, disfa_root, frames_dir="ActionUnit_Labels/SN001")
    (disfa_root / "ActionUnit_Labels/SN013/SN013_au26.txt").unlink()
    with pytest.raises(base.DatasetError, match="SN013_au26.txt"):
        _read(disfa.read, disfa_root, frame_naming="{i}.jpg")
    with pytest.raises(base.BadRecordError, match="SN003_au6.txt:6: unreadable frame number"):
        _read(disfa.read, disfa_root, "test", strict=True, fold=1, frame_naming="{i}.jpg")


def _check_seeded_subject_split(reader, root):
    """With a seed that puts a subject in each split, every row is in its subject's split."""
    for seed in range(50):
        keys = _check_splits(reader, root, seed=seed, validation_fraction=0.3, test_fraction=0.3)
        if all(keys[s] for s in ("train", "validation", "test")):
            break
    else:
        pytest.fail("no seed puts a subject in each split")
    for split in ("train", "validation", "test"):
        for key in keys[split]:
            assert base.subject_split(key.split("/")[0], seed, 0.3, 0.3) == split


def test_disfa_splits(disfa_root):
    _check_seeded_subject_split(disfa.read, disfa_root)
    # fold 1 tests on part 3 (SN003), fold 2 on part 2 (SN013), fold 3 on part 1 (SN001).
    for fold, held_out in ((1, "SN003"), (2, "SN013"), (3, "SN001")):
        keys = _check_splits(disfa.read, disfa_root, fold=fold, validation_fraction=0.5)
        assert {k.split("/")[0] for k in keys["test"]} == {held_out}
        assert not {k.split("/")[0] for k in keys["train"] | keys["validation"]} & {held_out}
    subjects = ("SN001", "SN013")
    for seed in range(50):
        keys = _check_splits(disfa.read, disfa_root, fold=1, validation_fraction=0.5, seed=seed)
        if keys["validation"] and keys["train"]:
            break
    else:
        pytest.fail("no seed puts a training subject in validation")
    assert {k.split("/")[0] for k in keys["train"] | keys["validation"]} == set(subjects)
    with pytest.raises(base.DatasetError, match="fold must be"):
        _read(disfa.read, disfa_root, fold=4)
    _write_disfa(disfa_root, {"SN099": [1]})
    with pytest.raises(base.DatasetError, match="SN099 is in none"):
        _read(disfa.read, disfa_root, fold=2)


# -------------------------------------------------------------------------------------- BP4D

BP4D_HEADER = ",".join(str(c) for c in range(100))


def _bp4d_row(frame, codes: dict, fields: int = 100, fill=9) -> str:
    """An AU_OCC row: frame, then AU 1..99 (`fill` unless given)."""
    return ",".join([str(frame)] + [str(codes.get(au, fill)) for au in range(1, fields)])


BENCH = {1: 1, 2: 0, 4: 9, 6: 1, 7: 0, 10: 1, 12: 1, 14: 0, 15: 0, 17: 0, 23: 1, 24: 0}
# The 12 AUs BP4D's files code; a value in any other column is never a label.
BP4D_CODED = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)


def _bp4d_au(codes: dict) -> list:
    return _au({au: -1 if v == 9 else v for au, v in codes.items() if au in BP4D_CODED})


@pytest.fixture
def bp4d_root(tmp_path):
    root = tmp_path / "BP4D"
    occ = root / "AUCoding/AU_OCC"
    _write(occ / "F001_T1.csv", [
        BP4D_HEADER,
        _bp4d_row(643, BENCH),
        _bp4d_row(644, {**BENCH, 2: 2}),                       # value 2
        _bp4d_row(645, {27: 1}),                               # none of the 17 coded
        _bp4d_row(646, BENCH, fields=99),                      # a field short
        _bp4d_row(643, {1: 0}),                                # frame 643 again
        _bp4d_row(648, BENCH),                                 # no image
        _bp4d_row("abc", BENCH),                               # frame not a number
        _bp4d_row(1000, {**BENCH, 1: "1.0", 2: "0.0"}),        # written as floats
        _bp4d_row(1001, {**BENCH, 6: "nan"}),                  # NaN
        _bp4d_row(1002, {**BENCH, 7: ""}),                     # empty cell
    ], newline="\r\n", last_newline=False)
    _write(occ / "M011_T1.csv", [BP4D_HEADER, _bp4d_row(7, {12: 1, 25: 0}),
                                 # Uncoded columns holding 0, and a 1 in AU25's column.
                                 _bp4d_row(8, {**BENCH, 25: 1}, fill=0)])
    _write(occ / "M009_T3.csv", [BP4D_HEADER, _bp4d_row(50, {1: 0, 5: 1})])
    _write(occ / "F007_T8.csv", [BP4D_HEADER, _bp4d_row(7, {14: 1})])
    _write(occ / "notes.csv", ["not,a,label,file"])
    images = root / "Sequences(2D+3D)"
    for name in ("F001/T1/0643.jpg", "F001/T1/1000.jpg", "F001/T1/1001.jpg", "F001/T1/1002.jpg",
                 "M011/T1/7.jpg", "M011/T1/8.jpg", "M009/T3/050.jpg", "F007/T8/0007.jpg"):
        _image(images / name)
    return root


def test_bp4d_labels_and_skips(bp4d_root):
    table = _read(bp4d.read_bp4d, bp4d_root)
    assert _rows(table) == [
        ("F001/T1/643", _bp4d_au(BENCH), "F001"),
        ("F001/T1/1000", _bp4d_au(BENCH), "F001"),
        ("F007/T8/7", _bp4d_au({14: 1}), "F007"),
        ("M009/T3/50", _bp4d_au({1: 0, 5: 1}), "M009"),
        ("M011/T1/7", _bp4d_au({12: 1, 25: 0}), "M011"),
        ("M011/T1/8", _bp4d_au(BENCH), "M011"),
    ]
    # Over taxonomy.AUS: AU4 is coded 9; AU5, 9, 20, 25 and 26 are not coded by BP4D, so
    # missing even where their column holds 0 or 1 (M011/T1/8).
    bench = [1, 0, -1, -1, 1, 0, -1, 1, 1, 0, 0, 0, -1, 1, 0, -1, -1]
    assert _rows(table)[0][1] == _rows(table)[-1][1] == bench
    assert _rows(table)[3][1] == [0] + [-1] * 16  # M009: AU1 0; AU5's 1 is not a label
    images = bp4d_root / "Sequences(2D+3D)"
    assert [Path(p).relative_to(images).as_posix() for p in table.columns()["path"]] == [
        "F001/T1/0643.jpg", "F001/T1/1000.jpg", "F007/T8/0007.jpg", "M009/T3/050.jpg",
        "M011/T1/7.jpg", "M011/T1/8.jpg"]
    occ = bp4d_root / "AUCoding/AU_OCC/F001_T1.csv"
    assert table.skips.counts == collections.Counter({
        "AU value not 0, 1 or 9": 3, "no AU label": 1, "wrong number of fields": 1,
        "duplicated key": 1, "image file not found": 1, "unreadable frame number": 1})
    where = {reason: [t.split(": ")[0] for t in texts]
             for reason, texts in table.skips.first.items()}
    assert where == {
        "AU value not 0, 1 or 9": [f"{occ}:3", f"{occ}:10", f"{occ}:11"],
        "no AU label": [f"{occ}:4"], "wrong number of fields": [f"{occ}:5"],
        "duplicated key": [f"{occ}:6"], "image file not found": [f"{occ}:7"],
        "unreadable frame number": [f"{occ}:8"]}
    assert "AU2 is '2'" in table.skips.first["AU value not 0, 1 or 9"][0]


def test_bp4d_variants_and_errors(bp4d_root, tmp_path):
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(base.DatasetError, match=r"AUCoding/AU_OCC/\*_\*\.csv"):
        _read(bp4d.read_bp4d, tmp_path / "nowhere")
    copy = tmp_path / "copy"
    _write(copy / "nested/AUCoding/AUCoding/M011_T1.csv",
           [BP4D_HEADER, _bp4d_row(643, {12: 1, 25: 0})])
    _image(copy / "frames/M011/T1/643.jpg")
    table = _read(bp4d.read_bp4d, copy, images_dir="frames")
    assert _rows(table) == [("M011/T1/643", _bp4d_au({12: 1, 25: 0}), "M011")]
    with pytest.raises(base.DatasetError, match=r"Sequences\(2D\+3D\)"):
        _read(bp4d.read_bp4d, copy)
    with pytest.raises(base.DatasetError, match="image folder"):
        _read(bp4d.read_bp4d, copy, images_dir="pictures")
    _write(copy / "nested/AUCoding/AUCoding/M012_T1.csv", ["0,1,AU2", "1,0,0"])
    with pytest.raises(base.DatasetError, match=r"M012_T1.csv: header cell 3 is 'AU2'"):
        _read(bp4d.read_bp4d, copy, images_dir="frames")
    (copy / "nested/AUCoding/AUCoding/M012_T1.csv").write_bytes(b"")
    with pytest.raises(base.DatasetError, match="M012_T1.csv: empty file"):
        _read(bp4d.read_bp4d, copy, images_dir="frames")
    with pytest.raises(base.BadRecordError, match=r"F001_T1.csv:3: AU value not 0, 1 or 9"):
        _read(bp4d.read_bp4d, bp4d_root, strict=True)


def test_bp4d_splits(bp4d_root):
    for fold, held_out in ((1, {"F007", "M009"}), (2, {"M011"}), (3, {"F001"})):
        keys = _check_splits(bp4d.read_bp4d, bp4d_root, fold=fold, validation_fraction=0.5)
        assert {k.split("/")[0] for k in keys["test"]} == held_out
        assert not {k.split("/")[0] for k in keys["train"] | keys["validation"]} & held_out
    _check_seeded_subject_split(bp4d.read_bp4d, bp4d_root)
    with pytest.raises(base.DatasetError, match="fold must be"):
        _read(bp4d.read_bp4d, bp4d_root, fold=0)
    _write(bp4d_root / "AUCoding/AU_OCC/F099_T1.csv", [BP4D_HEADER, _bp4d_row(1, {1: 1})])
    with pytest.raises(base.DatasetError, match="F099 is in none"):
        _read(bp4d.read_bp4d, bp4d_root, fold=1)


# BP4D+: the header names each column's AU, and the frame column's cell repeats the first AU.
PLUS_AUS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24, 27)
PLUS_HEADER = ",".join(str(au) for au in (1,) + PLUS_AUS)


def _plus_row(frame, codes: dict) -> str:
    return ",".join([str(frame)] + [str(codes.get(au, 0)) for au in PLUS_AUS])


@pytest.fixture
def plus_root(tmp_path):
    root = tmp_path / "BP4D+/RawData"
    occ = root / "AUCoding/AU_OCC"
    _write(occ / "F001_T1.csv", [PLUS_HEADER, _plus_row(12, {4: 1, 24: 9}),
                                 _plus_row(13, {4: 5}), _plus_row(1000, {27: 1})],
           newline="\r\n")
    _write(occ / "M040_T10.csv", [PLUS_HEADER, _plus_row(5, {1: 1, 2: 1})])
    _image(root / "2D+3D/F001/T1/012.jpg")
    _image(root / "2D+3D/F001/T1/1000.jpg")
    _image(root / "2D+3D/M040/T10/0005.jpg")
    return root


def _plus_au(codes: dict) -> list:
    return _au({au: -1 if codes.get(au, 0) == 9 else codes.get(au, 0) for au in PLUS_AUS})


def test_bp4d_plus(plus_root, tmp_path):
    table = _read(bp4d.read_bp4d_plus, plus_root)
    assert _rows(table) == [
        ("F001/T1/12", _plus_au({4: 1, 24: 9}), "F001"),
        ("F001/T1/1000", _plus_au({27: 1}), "F001"),
        ("M040/T10/5", _plus_au({1: 1, 2: 1}), "M040"),
    ]
    # Column 3 is AU4 (not AU3), the last AU24 is unknown, AU5 is not annotated.
    assert _rows(table)[0][1] == [0, 0, 1, -1, 0, 0, -1, 0, 0, 0, 0, 0, -1, 0, -1, -1, -1]
    assert table.skips.counts == collections.Counter({"AU value not 0, 1 or 9": 1})
    for seed in range(50):
        keys = _check_splits(bp4d.read_bp4d_plus, plus_root, seed=seed, validation_fraction=0.5,
                             test_fraction=0.5)
        if keys["test"] and keys["validation"]:
            break
    else:
        pytest.fail("no seed separates the two subjects")
    (plus_root / "AUCoding/AU_OCC").rename(plus_root / "AUCoding/OCC")
    with pytest.raises(base.DatasetError, match=r"AU_OCC/\*_\*\.csv"):
        _read(bp4d.read_bp4d_plus, plus_root)
    (plus_root / "AUCoding/OCC").rename(plus_root / "AUCoding/AU_OCC")
    (plus_root / "2D+3D").rename(plus_root / "3D")
    with pytest.raises(base.DatasetError, match=r"found no image folder .*2D\+3D"):
        _read(bp4d.read_bp4d_plus, plus_root)
    (plus_root / "3D").rename(plus_root / "2D+3D")
    (plus_root / "2D+3D/F002.zip").write_bytes(b"PK")
    _write(plus_root / "AUCoding/AU_OCC/F002_T1.csv", [PLUS_HEADER, _plus_row(1, {})])
    with pytest.raises(base.DatasetError, match="unzip it"):
        _read(bp4d.read_bp4d_plus, plus_root)
    _write(plus_root / "AUCoding/AU_OCC/F002_T1.csv", ["1,1,2,2", "1,0,0,0"])
    with pytest.raises(base.DatasetError, match="two header columns name AU2"):
        _read(bp4d.read_bp4d_plus, plus_root)


def test_registry_names():
    from data_pipelines.sources import reader, reader_options  # pylint: disable=g-import-not-at-top
    assert reader("bp4d") is bp4d.read_bp4d and reader("bp4d_plus") is bp4d.read_bp4d_plus
    assert reader("disfa") is disfa.read and reader("emotionet") is emotionet.read
    assert reader_options("disfa")["threshold"] == 2
    assert reader_options("bp4d")["fold"] is None
    assert "fold" not in reader_options("bp4d_plus")
    assert math.isclose(reader_options("emotionet")["test_fraction"], 0.1)
