"""The AffectNet (both releases) and Aff-Wild2 (every ABAW layout) dataset sources."""

import math

import numpy as np
import pytest
from PIL import Image

from data_pipelines.sources import BadRecordError, DatasetError, base, get_source, reader_options
from data_pipelines.sources import affectnet, affwild2
from fbnet_jax.core import taxonomy


def _jpg(path, size=(8, 8), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    pixels = (np.arange(h * w * 3).reshape(h, w, 3) * (7 + seed) % 251).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def _write(path, lines, newline="\n", final_newline=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((newline.join(lines) + (newline if final_newline else "")).encode())
    return path


def _au(labels=None):
    """The 17-AU list: `labels` {AU: 0/1}, -1 elsewhere (None: no AU labelled)."""
    labels = labels or {}
    return tuple(labels.get(au, -1) for au in taxonomy.AUS)


def _all(skips):
    """Skipped and left-out rows by reason. Left out (never strict errors) are the datasets' own
    classes outside the 7 and the challenge's not-annotated markers; the rest is bad data."""
    policy = {"contempt", "expression None", "expression Uncertain", "no face",
              "valence/arousal not annotated", "expression not annotated", "expression Other",
              "AUs not annotated", "no label"}
    assert set(skips.dropped) <= policy and not set(skips.counts) & policy, (skips.counts,
                                                                             skips.dropped)
    return dict(skips.counts + skips.dropped)


def _read(reader, root, split="all", strict=False, **options):
    table = base.Table(base.Skips("test", strict=strict))
    reader(root, split, table, **options)
    return table


def _rows(table):
    """(key, expression, au, va or None) of every row, VA rounded to 6 decimals."""
    c = table.columns()
    out = []
    for k in range(len(c["key"])):
        va = c["va"][k]
        out.append((c["key"][k], int(c["expression"][k]), tuple(int(a) for a in c["au"][k]),
                    None if np.isnan(va).any() else (round(float(va[0]), 6),
                                                     round(float(va[1]), 6))))
    return out


def _keys(table):
    return list(table.columns()["key"])


def _check_splits(reader, root, **options):
    """train / validation / test are disjoint and together are `all`; returns them."""
    parts = {s: _keys(_read(reader, root, s, **options))
             for s in ("train", "validation", "test", "all")}
    for s in ("train", "validation", "test"):
        assert parts[s], f"empty {s} split"
    together = parts["train"] + parts["validation"] + parts["test"]
    assert len(set(together)) == len(together)
    assert sorted(together) == sorted(parts["all"])
    return parts


# --- AffectNet, CSV release ------------------------------------------------------------------

AFFECTNET_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
                    "expression,valence,arousal")


def _landmarks():
    """68 points, the eye points (36-47) level: left eye at x 12..14, right eye at x 24..26."""
    points = [(10.0 + 0.25 * k, 8.0 + k % 5) for k in range(68)]
    for k in range(36, 42):
        points[k] = (12.0 + (k - 36) * 0.4, 12.0)
    for k in range(42, 48):
        points[k] = (24.0 + (k - 42) * 0.4, 12.0)
    return points


def _landmark_text(points):
    return ";".join(f"{v:.2f}" for p in points for v in p)


AFFECTNET_TRAIN = [
    AFFECTNET_HEADER,
    f"0/n.jpg,1.0,2.0,5,4,{_landmark_text(_landmarks())},0,0.1,-0.2",        # 2
    f"1/h.jpg,10,6,20,20,{_landmark_text(_landmarks())},1,0.785714,-0.055556",  # 3
    "2/s.jpg,0,0,8,8,,2,-0.5,0.25",                                         # 4
    "2/u.jpg,0,0,8,8,,3,0.3,0.6",                                           # 5
    "2/f.jpg,0,0,8,8,,4,-0.1,0.9",                                          # 6
    "2/d.jpg,0,0,8,8,,5,-0.7,0.2",                                          # 7
    "2/a.jpg,0,0,8,8,,6,-0.6,0.7",                                          # 8
    "3/c.jpg,0,0,8,8,,7,-0.4,0.3",                                          # 9 contempt
    "3/none.jpg,0,0,8,8,,8,0.0,0.1",                                        # 10 None, kept
    "3/unc.jpg,0,0,8,8,,9,-2,-2",                                           # 11 Uncertain
    "3/nf.jpg,0,0,8,8,,10,-2,-2",                                           # 12 No-Face
    "3/x11.jpg,0,0,8,8,,11,0.1,0.1",                                        # 13 unknown code
    "3/nan.jpg,0,0,8,8,,1,nan,0.1",                                         # 14 NaN
    "3/big.jpg,0,0,8,8,,1,1.5,0.1",                                         # 15 out of range
    "3/short.jpg,0,0,8,8,1,0.1,0.1",                                        # 16 8 fields
    f"3/lmk.jpg,0,0,8,8,{_landmark_text(_landmarks()[:67])},1,0.1,0.1",     # 17 134 numbers
    "3/neg.jpg,0,0,-1,8,,1,0.1,0.1",                                        # 18 negative width
    "4/gone.jpg,0,0,8,8,,1,0.1,0.1",                                        # 19 no image
    "0/n.jpg,1.0,2.0,5,4,,6,0.1,0.1",                                       # 20 duplicate
    "3/txt.jpg,0,0,8,8,,1,abc,0.1",                                         # 21 not a number
    "2/m.jpg,0,0,8,8,,0,-2,-2",                                             # 22 VA not annotated
    "3/c2.jpg,0,0,8,8,,7,-2,-2",                                            # 23 contempt, no VA
    "",
    "3/code.jpg,0,0,8,8,,1.5,0.1,0.1",                                      # 25 not an integer
    "3/none2.jpg,0,0,8,8,,8,-2,-2",                                         # 26 None, no VA
]
AFFECTNET_VALIDATION = [AFFECTNET_HEADER, "5/v.jpg,0,0,8,8,,6,-0.8,0.5",
                        "5/w.jpg,0.0,0.0,8.0,8.0,,1,0.2,0.3"]
IMAGES = "Manually_Annotated_Images/"
AFFECTNET_TRAIN_ROWS = [
    (IMAGES + "0/n.jpg", 0, _au(), (0.1, -0.2)),
    (IMAGES + "1/h.jpg", 4, _au(), (0.785714, -0.055556)),
    (IMAGES + "2/s.jpg", 5, _au(), (-0.5, 0.25)),
    (IMAGES + "2/u.jpg", 6, _au(), (0.3, 0.6)),
    (IMAGES + "2/f.jpg", 3, _au(), (-0.1, 0.9)),
    (IMAGES + "2/d.jpg", 2, _au(), (-0.7, 0.2)),
    (IMAGES + "2/a.jpg", 1, _au(), (-0.6, 0.7)),
    (IMAGES + "3/none.jpg", -1, _au(), (0.0, 0.1)),
    (IMAGES + "2/m.jpg", 0, _au(), None),
]
AFFECTNET_TEST_ROWS = [(IMAGES + "5/v.jpg", 1, _au(), (-0.8, 0.5)),
                       (IMAGES + "5/w.jpg", 4, _au(), (0.2, 0.3))]
AFFECTNET_SKIPS = {"contempt": 2, "no label": 1, "expression Uncertain": 1, "no face": 1,
                   "unknown expression code": 2, "bad valence/arousal": 3,
                   "wrong number of fields": 1, "bad landmarks": 1, "bad face box": 1,
                   "image file not found": 1, "duplicated key": 1}


def _affectnet_csv(root):
    lists = root / "Manually_Annotated_file_lists"
    _write(lists / "training.csv", AFFECTNET_TRAIN, newline="\r\n")
    _write(lists / "validation.csv", AFFECTNET_VALIDATION, final_newline=False)
    for k, line in enumerate(AFFECTNET_TRAIN[1:] + AFFECTNET_VALIDATION[1:]):
        name = line.split(",")[0]
        if name and name != "4/gone.jpg":
            _jpg(root / IMAGES / name, (40, 32) if name == "1/h.jpg" else (8, 8), seed=k)
    return root


def test_affectnet_csv_reads_every_label_box_and_landmark(tmp_path):
    table = _read(affectnet.read, _affectnet_csv(tmp_path))
    assert _rows(table) == AFFECTNET_TRAIN_ROWS + AFFECTNET_TEST_ROWS
    assert _all(table.skips) == AFFECTNET_SKIPS
    c = table.columns()
    np.testing.assert_array_equal(c["box"][:3], [[1, 2, 6, 6], [10, 6, 30, 26], [0, 0, 8, 8]])
    np.testing.assert_array_equal(c["box"][-1], [0, 0, 8, 8])
    assert sorted(c["landmarks"]) == [0, 1]
    np.testing.assert_allclose(c["landmarks"][1], np.array(_landmarks(), np.float32), atol=0.01)
    assert c["landmarks"][1].shape == (68, 2)
    assert list(c["group"]) == [""] * len(c["key"])


def test_affectnet_csv_crops_the_face_box_eye_aligned(tmp_path):
    root = _affectnet_csv(tmp_path)
    record = get_source("affectnet", root, "all", margin=0.0)[1]
    assert record["key"] == IMAGES + "1/h.jpg" and int(record["expression"]) == 4
    image = np.asarray(Image.open(root / IMAGES / "1/h.jpg").convert("RGB"))
    # Box (10, 6, 30, 26); the eyes are level, so the crop is not rotated (landmarks read as
    # y, x would put the eyes one above the other and turn it by 90 degrees).
    np.testing.assert_array_equal(record["image"], image[6:26, 10:30])


def test_affectnet_csv_splits(tmp_path):
    root = _affectnet_csv(tmp_path / "AffectNet")
    parts = _check_splits(affectnet.read, root, validation_fraction=0.4, seed=3)
    assert _rows(_read(affectnet.read, root, "test")) == AFFECTNET_TEST_ROWS
    # By image: the split follows subDirectory_filePath, wherever root points.
    expected = [r[0] for r in AFFECTNET_TRAIN_ROWS
                if base.subject_split(r[0][len(IMAGES):], 3, 0.4, 0.0) == "validation"]
    assert parts["validation"] == expected
    assert parts["train"] == [r[0] for r in AFFECTNET_TRAIN_ROWS if r[0] not in expected]
    assert _keys(_read(affectnet.read, tmp_path, "validation", validation_fraction=0.4,
                       seed=3)) == ["AffectNet/" + key for key in expected]
    assert reader_options("affectnet") == {"validation_fraction": 0.05, "seed": 0,
                                           "keep_contempt_as_missing_expression": False,
                                           "keep_none_as_missing_expression": True}
    # The default 5% validation: still a partition of the training file.
    train = _keys(_read(affectnet.read, root, "train"))
    validation = _keys(_read(affectnet.read, root, "validation"))
    assert sorted(train + validation) == sorted(r[0] for r in AFFECTNET_TRAIN_ROWS)


def test_affectnet_keep_contempt_as_missing_expression(tmp_path):
    table = _read(affectnet.read, _affectnet_csv(tmp_path), "all",
                  keep_contempt_as_missing_expression=True)
    rows = _rows(table)
    assert (IMAGES + "3/c.jpg", -1, _au(), (-0.4, 0.3)) in rows
    assert len(rows) == len(AFFECTNET_TRAIN_ROWS) + len(AFFECTNET_TEST_ROWS) + 1
    skips = dict(AFFECTNET_SKIPS, **{"no label": 2})
    del skips["contempt"]
    assert _all(table.skips) == skips


def test_affectnet_none_rows_keep_their_valence_arousal_or_are_dropped(tmp_path):
    root = _affectnet_csv(tmp_path)
    record = get_source("affectnet", root, "all")[7]
    assert record["key"] == IMAGES + "3/none.jpg"
    assert int(record["expression"]) == -1
    np.testing.assert_array_equal(record["va"], np.array([0.0, 0.1], np.float32))
    # Dropped on request: the None row with VA and the one without are counted as None.
    table = _read(affectnet.read, root, "all", keep_none_as_missing_expression=False)
    assert _rows(table) == [row for row in AFFECTNET_TRAIN_ROWS + AFFECTNET_TEST_ROWS
                            if row[0] != IMAGES + "3/none.jpg"]
    skips = dict(AFFECTNET_SKIPS, **{"expression None": 2})
    del skips["no label"]
    assert _all(table.skips) == skips
    for option in ("keep_none_as_missing_expression", "keep_contempt_as_missing_expression"):
        with pytest.raises(DatasetError) as error:
            get_source("affectnet", root, "all", **{option: "no"})
        assert str(error.value) == f"affectnet: option {option} must be True or False, got 'no'"


def test_affectnet_csv_strict_stops_at_the_first_bad_row(tmp_path):
    root = _affectnet_csv(tmp_path)
    with pytest.raises(BadRecordError, match=r"training\.csv:13: unknown expression code"):
        _read(affectnet.read, root, "all", strict=True)
    with pytest.raises(BadRecordError, match=r"training\.csv:13: unknown expression code"):
        get_source("affectnet", root, "train", strict=True, validation_fraction=0.0)


def test_affectnet_csv_layout_errors(tmp_path):
    root = _affectnet_csv(tmp_path / "a")
    (root / "Manually_Annotated_file_lists/validation.csv").unlink()
    assert _keys(_read(affectnet.read, root, "train"))  # the training list alone is enough
    with pytest.raises(DatasetError, match=r"Manually_Annotated_file_lists/validation\.csv does "
                                           r"not exist"):
        _read(affectnet.read, root, "test")
    _write(root / "Manually_Annotated_file_lists/training.csv",
           ["subDirectory_filePath,face_x,face_y,expression", "0/n.jpg,1,2,0"])
    with pytest.raises(DatasetError, match=r"training\.csv: the header lacks face_width, "
                                           r"face_height, facial_landmarks, valence, arousal"):
        _read(affectnet.read, root, "train")
    _write(root / "Manually_Annotated_file_lists/training.csv", [])
    with pytest.raises(DatasetError, match=r"training\.csv: the header lacks subDirectory"):
        _read(affectnet.read, root, "train")
    other = tmp_path / "b"
    _write(other / "Manually_Annotated_file_lists/training.csv", AFFECTNET_TRAIN)
    with pytest.raises(DatasetError, match=r"image folder .*Manually_Annotated_Images does not"):
        _read(affectnet.read, other, "train")


# --- AffectNet, .npy release -----------------------------------------------------------------

NPY_TRAIN = {  # id: (exp, val, aro); None: no file
    "0": (np.array("1"), np.array("0.5"), np.array("-0.25")),
    "1": (np.array(0), np.array(0.1), np.array(-0.1, np.float32)),
    "2": (np.array("6"), np.array(0.2), np.array("0.3")),
    "3": (np.array("3"), np.array(2.0), np.array(0.1)),
    "4": (np.array("x"), np.array(0.1), np.array(0.1)),
    "5": (np.array(1), np.array(0.1), None),
    "6": (b"not an npy file", np.array(0.1), np.array(0.1)),
    "7": (np.array(6), np.array(0.1), np.array(0.1)),
    "10": (np.array(5.0), np.array("-0.3"), np.array(0.4)),
    "11": (np.array([1, 2]), np.array(0.1), np.array(0.1)),
    "12": (np.array(9), np.array(-2.0), np.array(-2.0)),
    "13": (np.array("3"), np.array("-2"), np.array("-2")),
    "14": (np.array(7), np.array(0.2), np.array(0.2)),
    "15": (np.array("8"), np.array(0.4), np.array(-0.4)),
}
NPY_VAL = {"0": (np.array(6), np.array(-0.8), np.array(0.5)),
           "1": (np.array("2"), np.array("0.3"), np.array("0.6"))}
NPY_TRAIN_ROWS = [("train_set/images/0.jpg", 4, _au(), (0.5, -0.25)),
                  ("train_set/images/1.jpg", 0, _au(), (0.1, -0.1)),
                  ("train_set/images/2.jpg", 1, _au(), (0.2, 0.3)),
                  ("train_set/images/10.jpg", 2, _au(), (-0.3, 0.4)),
                  ("train_set/images/13.jpg", 6, _au(), None),
                  ("train_set/images/15.jpg", -1, _au(), (0.4, -0.4))]
NPY_TEST_ROWS = [("val_set/images/0.jpg", 1, _au(), (-0.8, 0.5)),
                 ("val_set/images/1.jpg", 5, _au(), (0.3, 0.6))]


def _affectnet_npy(root):
    for folder, annotations in (("train_set", NPY_TRAIN), ("val_set", NPY_VAL)):
        (root / folder / "annotations").mkdir(parents=True)
        for image_id, values in annotations.items():
            for part, value in zip(("exp", "val", "aro"), values):
                path = root / folder / "annotations" / f"{image_id}_{part}.npy"
                if isinstance(value, bytes):
                    path.write_bytes(value)
                elif value is not None:
                    np.save(path, value)
            np.save(root / folder / "annotations" / f"{image_id}_lnd.npy",
                    np.arange(136, dtype=np.float32))
            if image_id != "7":
                _jpg(root / folder / "images" / f"{image_id}.jpg", (16, 16))
    return root


def test_affectnet_npy_reads_numeric_and_string_arrays(tmp_path):
    table = _read(affectnet.read, _affectnet_npy(tmp_path))
    assert _rows(table) == NPY_TRAIN_ROWS + NPY_TEST_ROWS
    assert _all(table.skips) == {
        "contempt": 1, "bad valence/arousal": 1, "unknown expression code": 1,
        "missing annotation file": 1, "unreadable annotation file": 2,
        "image file not found": 1, "expression Uncertain": 1}
    c = table.columns()
    assert np.isnan(c["box"]).all() and c["landmarks"] == {}
    assert _rows(_read(affectnet.read, tmp_path, "test")) == NPY_TEST_ROWS
    parts = _check_splits(affectnet.read, tmp_path, validation_fraction=0.4, seed=3)
    assert parts["validation"] == [r[0] for r in NPY_TRAIN_ROWS if base.subject_split(
        r[0].split("/")[-1][:-4], 3, 0.4, 0.0) == "validation"]
    source = get_source("affectnet", tmp_path, "test")
    assert source[0]["image"].shape == (16, 16, 3) and int(source[1]["expression"]) == 5


def test_affectnet_npy_strict_and_keep_contempt(tmp_path):
    root = _affectnet_npy(tmp_path)
    with pytest.raises(BadRecordError, match=r"/3_exp\.npy: bad valence/arousal"):
        _read(affectnet.read, root, "all", strict=True)
    rows = _rows(_read(affectnet.read, root, keep_contempt_as_missing_expression=True))
    assert rows[5] == ("train_set/images/14.jpg", -1, _au(), (0.2, 0.2))


def test_affectnet_detects_the_release(tmp_path):
    nested = _affectnet_npy(tmp_path / "one" / "AffectNet")
    assert _rows(_read(affectnet.read, tmp_path / "one", "test")) == [
        ("AffectNet/" + key, e, a, va) for key, e, a, va in NPY_TEST_ROWS]
    assert nested.is_dir()
    both = _affectnet_csv(_affectnet_npy(tmp_path / "both"))
    with pytest.raises(DatasetError, match="found both releases"):
        _read(affectnet.read, both)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"found no release under .*empty; looked for .*"
                                           r"Manually_Annotated_file_lists .*train_set/"
                                           r"annotations or .*val_set/annotations"):
        _read(affectnet.read, tmp_path / "empty")
    with pytest.raises(DatasetError, match="is not a folder"):
        _read(affectnet.read, tmp_path / "missing")
    train_only = tmp_path / "train_only"
    (train_only / "train_set" / "annotations").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"val_set/annotations does not exist"):
        _read(affectnet.read, train_only, "test")


# --- Aff-Wild2, per-task files ---------------------------------------------------------------

AUS12 = (1, 2, 4, 6, 7, 10, 12, 15, 23, 24, 25, 26)
AUS8 = (1, 2, 4, 6, 12, 15, 20, 25)
EXPR7 = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise"
LEFT, RIGHT = "10-60-1280x720_left", "10-60-1280x720_right"

EDITIONS = {
    "abaw1": ("annotations", ("VA_Set", "EXPR_Set", "AU_Set"), "Training_Set"),
    "abaw2": ("annotations", ("VA_Set", "EXPR_Set", "AU_Set"), "Train_Set"),
    "abaw3": ("Third ABAW Annotations", ("VA_Estimation_Challenge",
                                         "EXPR_Classification_Challenge",
                                         "AU_Detection_Challenge"), "Train_Set"),
    "abaw5": ("5th ABAW Annotations", ("VA_Estimation_Challenge",
                                       "EXPR_Classification_Challenge",
                                       "AU_Detection_Challenge"), "Train_Set"),
    "abaw6": ("6th_ABAW_Annotations", ("VA_Estimation_Challenge", "EXPR_Recognition_Challenge",
                                       "AU_Detection_Challenge"), "Train_Set"),
}

# task -> (header, {video: label lines}); the per-edition differences are patched in _task_files.
VA_FILES = ("valence,arousal", {
    LEFT: ["0.1,0.2", "0.3,-0.4"], RIGHT: ["-0.5,0.5"],
    "video1": ["0.602,0.389", "-5,-5", "-0.024,0.279"], "video2": ["0.7,0.1", "-0.2,-0.3"]})
EXPR_FILES = (EXPR7 + ",Other", {
    LEFT: ["-1", "6"], RIGHT: ["1"], "video1": ["4", "7", "0"], "video2": ["2", "3"]})
AU_FILES = (",".join(f"AU{a}" for a in AUS12), {
    LEFT: ["0,0,0,0,0,0,1,0,0,0,0,0", "1,1,1,1,1,1,1,1,1,1,1,1"],
    RIGHT: ["0,0,0,0,0,0,0,0,0,0,0,0"],
    "video1": ["0,0,0,0,1,0,0,0,0,0,1,0", ",".join(["-1"] * 12), "1,-1,0,0,0,0,0,0,0,0,0,1"],
    "video2": ["0,0,1,0,0,0,0,0,0,0,0,0", "0,1,0,0,0,0,0,0,0,0,0,0"]})
AU8_FILES = (",".join(f"AU{a}" for a in AUS8), {
    LEFT: ["0,0,0,0,1,0,0,0", "1,1,1,1,1,1,1,1"], RIGHT: ["0,0,0,0,0,0,0,0"],
    "video1": ["0,0,0,1,1,0,0,1", ",".join(["-1"] * 8), "1,-1,0,0,0,0,1,0"],
    "video2": ["0,0,1,0,0,0,0,0", "0,1,0,0,0,0,0,0"]})
ZERO12 = {a: 0 for a in AUS12}
ZERO8 = {a: 0 for a in AUS8}
# Train videos first (files in name order), then the Validation_Set video.
EXPECTED = {
    "va": [(f"{LEFT}/00001.jpg", -1, _au(), (0.1, 0.2)),
           (f"{LEFT}/00002.jpg", -1, _au(), (0.3, -0.4)),
           (f"{RIGHT}/00001.jpg", -1, _au(), (-0.5, 0.5)),
           ("video1/00001.jpg", -1, _au(), (0.602, 0.389)),
           ("video1/00003.jpg", -1, _au(), (-0.024, 0.279)),
           ("video2/00001.jpg", -1, _au(), (0.7, 0.1)),
           ("video2/00002.jpg", -1, _au(), (-0.2, -0.3))],
    "expr": [(f"{LEFT}/00002.jpg", 6, _au(), None),
             (f"{RIGHT}/00001.jpg", 1, _au(), None),
             ("video1/00001.jpg", 4, _au(), None),
             ("video1/00003.jpg", 0, _au(), None),
             ("video2/00001.jpg", 2, _au(), None),
             ("video2/00002.jpg", 3, _au(), None)],
    "au": [(f"{LEFT}/00001.jpg", -1, _au({**ZERO12, 12: 1}), None),
           (f"{LEFT}/00002.jpg", -1, _au({a: 1 for a in AUS12}), None),
           (f"{RIGHT}/00001.jpg", -1, _au(ZERO12), None),
           ("video1/00001.jpg", -1, _au({**ZERO12, 7: 1, 25: 1}), None),
           ("video1/00003.jpg", -1, _au({**{a: 0 for a in AUS12 if a != 2}, 1: 1, 26: 1}), None),
           ("video2/00001.jpg", -1, _au({**ZERO12, 4: 1}), None),
           ("video2/00002.jpg", -1, _au({**ZERO12, 2: 1}), None)],
    "au8": [(f"{LEFT}/00001.jpg", -1, _au({**ZERO8, 12: 1}), None),
            (f"{LEFT}/00002.jpg", -1, _au({a: 1 for a in AUS8}), None),
            (f"{RIGHT}/00001.jpg", -1, _au(ZERO8), None),
            ("video1/00001.jpg", -1, _au({**ZERO8, 6: 1, 12: 1, 25: 1}), None),
            ("video1/00003.jpg", -1, _au({**{a: 0 for a in AUS8 if a != 2}, 1: 1, 20: 1}), None),
            ("video2/00001.jpg", -1, _au({**ZERO8, 4: 1}), None),
            ("video2/00002.jpg", -1, _au({**ZERO8, 2: 1}), None)],
}


def _task_files(edition, task):
    if task == "va":
        return VA_FILES
    if task == "expr":
        return (EXPR7, EXPR_FILES[1]) if edition in ("abaw1", "abaw2") else EXPR_FILES
    return AU8_FILES if edition == "abaw1" else AU_FILES


def _frames(root, video, count, folder="cropped_aligned", missing=()):
    for frame in range(1, count + 1):
        if frame not in missing:
            _jpg(root / folder / video / f"{frame:05d}.jpg", seed=frame)


def _affwild2(root, edition):
    """An Aff-Wild2 copy in `edition`'s layout, with every task's files and their images."""
    annotations, task_folders, train = EDITIONS[edition]
    for task, folder in zip(("va", "expr", "au"), task_folders):
        header, videos = _task_files(edition, task)
        for video, lines in videos.items():
            part = "Validation_Set" if video == "video2" else train
            _write(root / annotations / folder / part / f"{video}.txt", [header] + lines,
                   newline="\r\n" if video == LEFT else "\n", final_newline=video != RIGHT)
    if edition == "abaw3":
        (root / annotations / "MTL_Challenge").mkdir()
    extra = edition in ("abaw5", "abaw6")
    for video, count in ((LEFT, 2), (RIGHT, 1), ("video1", 3), ("video2", 2)):
        folder = "cropped_aligned_new_50_vids" if extra and video == "video2" else "cropped_aligned"
        _frames(root, video, count, folder)
    return root


def _seed_splitting(first, second):
    """A seed that puts video `first` in train and video `second` in validation (fraction 0.5)."""
    return next(s for s in range(100) if base.subject_split(first, s, 0.5, 0.0) == "train"
                and base.subject_split(second, s, 0.5, 0.0) == "validation")


@pytest.mark.parametrize("edition", sorted(EDITIONS))
def test_affwild2_every_edition_layout(tmp_path, edition):
    root = _affwild2(tmp_path, edition)
    seed = _seed_splitting("video1", "10-60-1280x720")
    for task in ("va", "expr", "au"):
        expected = EXPECTED["au8" if task == "au" and edition == "abaw1" else task]
        table = _read(affwild2.read, root, task=task)
        assert _rows(table) == expected, (edition, task)
        skips = {"va": {"valence/arousal not annotated": 1},
                 "expr": {"expression not annotated": 1,
                          ("unknown expression code" if edition in ("abaw1", "abaw2")
                           else "expression Other"): 1},
                 "au": {"AUs not annotated": 1}}[task]
        assert _all(table.skips) == skips, (edition, task)
        groups = dict(zip(table.columns()["key"], table.columns()["group"]))
        assert groups[f"{LEFT}/00002.jpg"] == groups[f"{RIGHT}/00001.jpg"] == "10-60-1280x720"
        assert groups["video1/00001.jpg"] == "video1"
        parts = _check_splits(affwild2.read, root, task=task, validation_fraction=0.5, seed=seed)
        keys = [r[0] for r in expected]
        assert parts["test"] == [k for k in keys if k.startswith("video2/")]
        assert parts["validation"] == [k for k in keys if k.startswith("10-60")]
        assert parts["train"] == [k for k in keys if k.startswith("video1/")]


def test_affwild2_bad_lines(tmp_path):
    root = tmp_path
    va = root / "annotations/VA_Set"
    _write(va / "Train_Set/video1.txt", [
        "valence,arousal",
        "0.602,0.389",   # frame 1
        "-5,-5",         # 2 not annotated
        "-0.024,0.279",  # 3 no image
        "0.5,-5",        # 4 half annotated
        "1.2,0.1",       # 5 out of range
        "nan,0.1",       # 6 NaN
        "0.1",           # 7 one field
        "abc,0.1",       # 8 not a number
        "",              # 9 empty
        "0.3,0.4",       # 10
        "", ""], newline="\r\n")
    _write(va / "Validation_Set/video1.txt", ["valence,arousal", "0.1,0.1"])
    expr = root / "annotations/EXPR_Set/Train_Set/video1.txt"
    _write(expr, [EXPR7, "4", "8", "-1", "1.5", "x", "4,1", "7", "-2"])
    au = root / "annotations/AU_Set/Train_Set/video1.txt"
    _write(au, [",".join(f"AU{a}" for a in AUS12), "0,0,0,0,0,0,0,0,0,0,0,2",
                "0,0,0,0,0,0,0,0,0,0,0", ",".join(["-1"] * 12), "1,0,0,0,0,0,0,0,0,0,0,0"])
    _frames(root, "video1", 10, missing=(3,))

    table = _read(affwild2.read, root, "all")
    assert _rows(table) == [("video1/00001.jpg", -1, _au(), (0.602, 0.389)),
                            ("video1/00010.jpg", -1, _au(), (0.3, 0.4))]
    assert _all(table.skips) == {
        "valence/arousal not annotated": 2, "image file not found": 1,
        "valence/arousal out of range": 2, "wrong number of fields": 1, "unreadable value": 1,
        "empty label line": 1, "duplicated key": 1}
    assert table.skips.first["image file not found"][0].startswith(f"{va}/Train_Set/video1.txt:4")
    # Line 3's -5 marker is a frame left unannotated, not bad data: strict passes it.
    with pytest.raises(BadRecordError, match=r"Train_Set/video1\.txt:4: image file not found"):
        _read(affwild2.read, root, "all", strict=True)

    table = _read(affwild2.read, root, "train", task="expr", validation_fraction=0.0)
    assert _rows(table) == [("video1/00001.jpg", 4, _au(), None)]
    assert _all(table.skips) == {"unknown expression code": 4, "expression not annotated": 1,
                                        "unreadable value": 1, "wrong number of fields": 1}
    table = _read(affwild2.read, root, "train", task="au", validation_fraction=0.0)
    assert _rows(table) == [("video1/00004.jpg", -1, _au({**ZERO12, 1: 1}), None)]
    assert _all(table.skips) == {"unknown AU value": 1, "wrong number of fields": 1,
                                        "AUs not annotated": 1}


def test_affwild2_layout_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"found no VA annotation folder under .*empty; looked "
                                           r"for .*VA_Set/Train_Set.*VA_Estimation_Challenge"):
        _read(affwild2.read, tmp_path / "empty")
    with pytest.raises(DatasetError, match=r"EXPR_Recognition_Challenge/Validation_Set"):
        _read(affwild2.read, tmp_path / "empty", task="expr")
    with pytest.raises(DatasetError, match=r"looked for .*training_set_annotations\.txt"):
        _read(affwild2.read, tmp_path / "empty", task="mtl")
    with pytest.raises(DatasetError, match=r"unknown task 'valence'"):
        _read(affwild2.read, tmp_path / "empty", task="valence")

    root = tmp_path / "root"
    _write(root / "annotations/VA_Set/Train_Set/video1.txt", ["valence,arousal", "0.1,0.2"])
    with pytest.raises(DatasetError, match=r"found no image folder .* looked for .*"
                                           r"cropped_aligned\*"):
        _read(affwild2.read, root, "train")
    unchecked = base.Table(base.Skips("test"), check_files=False)
    affwild2.read(root, "train", unchecked, validation_fraction=0.0)
    assert list(unchecked.columns()["path"]) == [str(root / "cropped_aligned/video1/00001.jpg")]
    _frames(root, "video1", 1)
    with pytest.raises(DatasetError, match=r"annotations/VA_Set has no Validation_Set folder"):
        _read(affwild2.read, root, "test")
    assert _keys(_read(affwild2.read, root, "train", validation_fraction=0.0)) == [
        "video1/00001.jpg"]

    _write(root / "annotations/VA_Set/Train_Set/video1.txt", ["0.1,0.2", "0.3,0.4"])
    with pytest.raises(DatasetError, match=r"video1\.txt: line 1 \('0\.1,0\.2'\) is not a header"):
        _read(affwild2.read, root, "train")
    _write(root / "annotations/VA_Set/Train_Set/video1.txt", [])
    with pytest.raises(DatasetError, match=r"video1\.txt: empty file"):
        _read(affwild2.read, root, "train")
    _write(root / "annotations/AU_Set/Train_Set/video1.txt", ["AU1,AU2,Smile", "0,0,1"])
    with pytest.raises(DatasetError, match=r"the header 'AU1,AU2,Smile' is not a list of AUs"):
        _read(affwild2.read, root, "train", task="au")


def test_affwild2_generic_folder_names_and_nesting(tmp_path):
    """Folders matched by VA_* / *Train* / *Valid*, the release one folder down."""
    root = tmp_path / "release"
    _write(root / "Aff-Wild2/ABAW_annotations/VA_Track/Train_Split/video1.txt",
           ["valence,arousal", "0.1,0.2"])
    _write(root / "Aff-Wild2/ABAW_annotations/VA_Track/Valid_Split/video2.txt",
           ["valence,arousal", "0.3,0.4"])
    _frames(root / "Aff-Wild2", "video1", 1)
    _frames(root / "Aff-Wild2", "video2", 1)
    assert _rows(_read(affwild2.read, root)) == [("video1/00001.jpg", -1, _au(), (0.1, 0.2)),
                                                 ("video2/00001.jpg", -1, _au(), (0.3, 0.4))]


# --- Aff-Wild2, MTL files (s-Aff-Wild2) ------------------------------------------------------

Z12 = ",".join(["0"] * 12)
M12 = ",".join(["-1"] * 12)
MTL_TRAIN = [
    "image,valence,arousal,expression,aus",
    "video1/00001.jpg,0.602,0.389,4,0,0,0,0,1,0,0,0,0,0,1,0",   # 2
    "video1/00002.jpg,-5,-5,0,1,0,0,0,0,0,0,0,0,0,0,0",          # 3
    f"video1/00003.jpg,0.1,0.2,-1,{M12}",                        # 4
    f"video1/00004.jpg,-5,-5,-1,{M12}",                          # 5 no label
    f"video1/00005.jpg,0.1,0.2,7,{Z12}",                         # 6 Other
    f"video1/00006.jpg,0.1,0.2,9,{Z12}",                         # 7 unknown code
    f"video1/00007.jpg,1.5,0.2,1,{Z12}",                         # 8 out of range
    "video1/00008.jpg,0.1,0.2,1,0,0",                            # 9 6 fields
    "video1/00009.jpg,0.1,0.2,1,2,0,0,0,0,0,0,0,0,0,0,0",        # 10 AU value 2
    f"video1/00010.jpg,0.1,0.2,1,{Z12}",                         # 11 no image
    f"video1/00001.jpg,0.1,0.1,1,{Z12}",                         # 12 duplicate
    f"{LEFT}/00001.jpg,0.5,-5,3,-1,1,{','.join(['-1'] * 10)}",   # 13
    f"{RIGHT}/00001.jpg,-0.5,0.5,5,{Z12}",                       # 14
    f"video1/00011.jpg,0.1,abc,1,{Z12}",                         # 15 not a number
    f"novideo.jpg,0.1,0.1,1,{Z12}",                              # 16 no video folder
    "",
]
MTL_VALIDATION = ["image,valence,arousal,expression,aus",
                  f"video2/00001.jpg,0.7,0.1,2,{Z12}", f"video2/00002.jpg,-5,-5,6,{M12}"]
MTL_TRAIN_ROWS = [
    ("video1/00001.jpg", 4, _au({**ZERO12, 7: 1, 25: 1}), (0.602, 0.389)),
    ("video1/00002.jpg", 0, _au({**ZERO12, 1: 1}), None),
    ("video1/00003.jpg", -1, _au(), (0.1, 0.2)),
    (f"{LEFT}/00001.jpg", 3, _au({2: 1}), None),
    (f"{RIGHT}/00001.jpg", 5, _au(ZERO12), (-0.5, 0.5)),
]
MTL_TEST_ROWS = [("video2/00001.jpg", 2, _au(ZERO12), (0.7, 0.1)),
                 ("video2/00002.jpg", 6, _au(), None)]
MTL_SKIPS = {"no label": 1, "expression Other": 1, "unknown expression code": 1,
             "valence/arousal out of range": 1, "wrong number of fields": 1,
             "unknown AU value": 1, "image file not found": 1, "duplicated key": 1,
             "unreadable value": 1, "bad image name": 1}


def _mtl(root):
    _write(root / "training_set_annotations.txt", MTL_TRAIN, newline="\r\n")
    _write(root / "validation_set_annotations.txt", MTL_VALIDATION, final_newline=False)
    _frames(root, "video1", 11, missing=(10,))
    _frames(root, LEFT, 1)
    _frames(root, RIGHT, 1)
    _frames(root, "video2", 2)
    return root


def test_affwild2_mtl_file(tmp_path):
    root = _mtl(tmp_path)
    table = _read(affwild2.read, root, task="mtl")
    assert _rows(table) == MTL_TRAIN_ROWS + MTL_TEST_ROWS
    assert _all(table.skips) == MTL_SKIPS
    assert table.skips.first["unknown AU value"][0].startswith(
        f"{root}/training_set_annotations.txt:10")
    assert list(table.columns()["group"]) == [
        "video1", "video1", "video1", "10-60-1280x720", "10-60-1280x720", "video2", "video2"]
    assert _rows(_read(affwild2.read, root, "test", task="mtl")) == MTL_TEST_ROWS
    assert reader_options("affwild2") == {"task": "va", "validation_fraction": 0.1, "seed": 0,
                                          "keep_other_as_missing_expression": False}
    seed = _seed_splitting("video1", "10-60-1280x720")
    parts = _check_splits(affwild2.read, root, task="mtl", validation_fraction=0.5, seed=seed)
    assert parts["validation"] == [f"{LEFT}/00001.jpg", f"{RIGHT}/00001.jpg"]
    assert parts["train"] == [r[0] for r in MTL_TRAIN_ROWS[:3]]

    kept = _read(affwild2.read, root, task="mtl", keep_other_as_missing_expression=True)
    assert _rows(kept)[3] == ("video1/00005.jpg", -1, _au(ZERO12), (0.1, 0.2))
    assert "expression Other" not in kept.skips.dropped and len(kept) == len(table) + 1
    with pytest.raises(BadRecordError, match=r"training_set_annotations\.txt:7: unknown expression code"):
        _read(affwild2.read, root, "all", strict=True, task="mtl")

    source = get_source("affwild2", root, "test", task="mtl", aus=(1, 2, 4, 5))
    record = source[0]
    assert record["key"] == "video2/00001.jpg" and record["image"].shape == (8, 8, 3)
    np.testing.assert_array_equal(record["au"], [0, 0, 0, -1])
    assert math.isclose(float(record["va"][0]), 0.7, rel_tol=1e-6)


def test_affwild2_mtl_nested_and_keep_other_in_expr_task(tmp_path):
    root = _mtl(tmp_path / "data" / "s-Aff-Wild2")
    assert _rows(_read(affwild2.read, tmp_path / "data", "test", task="mtl")) == MTL_TEST_ROWS
    assert root.is_dir()
    # In the EXPR task an Other frame has no label left: skipped even when kept as missing.
    edition = _affwild2(tmp_path / "abaw3", "abaw3")
    table = _read(affwild2.read, edition, task="expr", keep_other_as_missing_expression=True)
    assert _rows(table) == EXPECTED["expr"]
    assert _all(table.skips) == {"expression Other": 1, "expression not annotated": 1}
