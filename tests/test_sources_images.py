"""Image-dataset sources: RAF-DB (basic, compound), FER2013, FER+, ExpW and CK+.

Each test writes a tiny copy of the dataset in its published format (the lines of
docs/datasets.md, quirks included) with tiny real images, reads it, and checks every
record's key and labels, the splits, and every kind of bad row the format can have.
"""

import collections
import logging

import numpy as np
import pytest
from PIL import Image

from data_pipelines import schema
from data_pipelines import sources
from data_pipelines.sources import base
from fbnet_jax.core import taxonomy

N, A, D, F, H, S, U = range(7)  # taxonomy.EXPRESSIONS order: Neutral ... Surprise
NO_AU = [-1] * 17


def _image(path, size=(16, 16), color=(90, 90, 90), boxes=()):
    """Writes an RGB image (format from the suffix); `boxes` are (x0, y0, x1, y1, color)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[:] = color
    for x0, y0, x1, y1, fill in boxes:
        array[y0:y1, x0:x1] = fill
    Image.fromarray(array).save(path)


def _write(path, text, newline="\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode())


def _read(name, root, split="all", strict=False, **options):
    table = base.Table(base.Skips(name, strict=strict))
    sources.reader(name)(root, split, table, **options)
    return table


def _rows(table):
    """(key, expression, au list, compound, group) of every row, in order."""
    c = table.columns()
    return [(k, int(e), a.tolist(), int(m), g)
            for k, e, a, m, g in zip(c["key"], c["expression"], c["au"], c["compound"], c["group"])]


def _keys(table):
    return list(table.columns()["key"])


def _check_splits(name, root, **options):
    """train, validation and test are disjoint and together the `all` split; returns them."""
    every = _keys(_read(name, root, "all", **options))
    parts = {s: _keys(_read(name, root, s, **options)) for s in ("train", "validation", "test")}
    joined = [k for part in parts.values() for k in part]
    assert sorted(joined) == sorted(every)
    assert len(set(joined)) == len(joined)
    return parts


# ------------------------------------------------------------------------------------- RAF-DB

# The verbatim lines of docs/datasets.md#raf-db (one per raw label) and the bad rows a copy
# can have.
RAF_BASIC = """train_00001.jpg 5
train_00002.jpg 5
train_00003.jpg 4
train_00004.jpg 1
train_00005.jpg 2
train_00006.jpg 3
train_00007.jpg 6
train_00008.jpg 7
train_00009.jpg 8
train_00010.jpg
train_00011.jpg 0
val_00001.jpg 3
train_00001.jpg 4
test_0001.jpg 5
test_0002.jpg 1
test_0003.jpg 2
test_3068.jpg 7"""  # no newline after the last line, as in the real file

RAF_BASIC_EXPECTED = [  # raw 1 Sur, 2 Fea, 3 Dis, 4 Hap, 5 Sad, 6 Ang, 7 Neu
    ("train_00001", S), ("train_00002", S), ("train_00003", H), ("train_00004", U),
    ("train_00005", F), ("train_00006", D), ("train_00007", A), ("train_00008", N),
    ("test_0001", S), ("test_0002", U), ("test_3068", N)]

# docs/datasets.md#raf-db: compound set (4/3-digit names), labels 1..11.
RAF_COMPOUND = "\n".join(
    [f"train_{k:04d}.jpg {k}" for k in range(1, 12)]
    + ["train_0012.jpg 12", "train_0013.jpg 0", "train_0014.jpg x", "test_001.jpg 1",
       "test_002.jpg 6"]) + "\n"


def _raf_set(folder, labels, label_name="list_patition_label.txt", missing=()):
    _write(folder / "EmoLabel" / label_name, labels)
    for line in labels.splitlines():
        if line.split():
            stem = line.split()[0][:-4]
            if stem not in missing:
                _image(folder / "Image" / "aligned" / f"{stem}_aligned.jpg")


@pytest.fixture
def raf_root(tmp_path):
    root = tmp_path / "RAF"
    _raf_set(root / "basic", RAF_BASIC, missing=("test_0003",))
    _raf_set(root / "compound", RAF_COMPOUND, label_name="list_partition_label.txt")
    return root


def test_rafdb_basic_labels_and_skips(raf_root):
    table = _read("rafdb", raf_root)
    expected = [(f"basic/Image/aligned/{stem}_aligned.jpg", e, NO_AU, -1, "")
                for stem, e in RAF_BASIC_EXPECTED]
    assert _rows(table) == expected
    assert table.skips.counts == collections.Counter({
        "unknown expression code": 2, "wrong number of fields": 1, "unknown split prefix": 1,
        "duplicated key": 1, "image file not found": 1})
    assert "list_patition_label.txt:10" in table.skips.first["wrong number of fields"][0]


def test_rafdb_compound_labels(raf_root):
    table = _read("rafdb_compound", raf_root)
    expected = [(f"compound/Image/aligned/train_{k:04d}_aligned.jpg", -1, NO_AU, k - 1, "")
                for k in range(1, 12)]
    expected += [("compound/Image/aligned/test_001_aligned.jpg", -1, NO_AU, 0, ""),
                 ("compound/Image/aligned/test_002_aligned.jpg", -1, NO_AU, 5, "")]
    assert _rows(table) == expected
    assert table.skips.counts == collections.Counter({"unknown compound code": 3})


def test_rafdb_compound_order_is_the_taxonomy_order():
    # docs/datasets.md#raf-db, the RAF compound README's labels 1..11.
    readme = ("Happily Surprised", "Happily Disgusted", "Sadly Fearful", "Sadly Angry",
              "Sadly Surprised", "Sadly Disgusted", "Fearfully Angry", "Fearfully Surprised",
              "Angrily Surprised", "Angrily Disgusted", "Disgustedly Surprised")
    assert taxonomy.RAF_COMPOUND_CLASSES == readme


def test_rafdb_splits(raf_root):
    parts = _check_splits("rafdb", raf_root, validation_fraction=0.5, seed=3)
    stems = {s: [k.split("/")[-1][:-len("_aligned.jpg")] for k in keys]
             for s, keys in parts.items()}
    assert stems["test"] == ["test_0001", "test_0002", "test_3068"]
    train = [stem for stem, _ in RAF_BASIC_EXPECTED if stem.startswith("train_")]
    assert sorted(stems["train"] + stems["validation"]) == train
    assert stems["validation"] == [t for t in train if base.subject_split(
        f"{t}.jpg", 3, 0.5, 0.0) == "validation"]
    assert stems["train"] and stems["validation"]


def test_rafdb_nested_copy_crlf_and_wrong_set(tmp_path):
    root = tmp_path / "copy"
    _raf_set(root / "RAF_DB" / "basic", "train_00001.jpg 4\r\ntest_0001.jpg 6\r\n")
    (root / "__MACOSX").mkdir()
    table = _read("rafdb", root)
    assert _rows(table) == [
        ("RAF_DB/basic/Image/aligned/train_00001_aligned.jpg", H, NO_AU, -1, ""),
        ("RAF_DB/basic/Image/aligned/test_0001_aligned.jpg", A, NO_AU, -1, "")]
    with pytest.raises(base.DatasetError, match="basic set"):
        _read("rafdb_compound", root)
    only_compound = tmp_path / "c"
    _raf_set(only_compound / "compound", "train_0001.jpg 4\n")
    with pytest.raises(base.DatasetError, match="compound set"):
        _read("rafdb", only_compound)


def test_rafdb_wrong_root_and_options(tmp_path):
    with pytest.raises(base.DatasetError, match="list_patition_label.txt"):
        _read("rafdb", tmp_path)
    _write(tmp_path / "EmoLabel" / "list_patition_label.txt", "train_00001.jpg 4\n")
    with pytest.raises(base.DatasetError, match="Image/aligned"):
        _read("rafdb", tmp_path)
    with pytest.raises(base.DatasetError, match="images must be"):
        _read("rafdb", tmp_path, images="cropped")


def test_rafdb_original_images_with_boxes(tmp_path):
    root = tmp_path / "basic"
    _write(root / "EmoLabel" / "list_patition_label.txt",
           "train_00001.jpg 4\ntrain_00002.jpg 1\ntrain_00003.jpg 2")
    white = (255, 255, 255)
    for k in (1, 2, 3):
        _image(root / "Image" / "original" / f"train_0000{k}.jpg", (64, 48), (0, 0, 0),
               [(10, 8, 40, 38, white)])
    boxes = root / "Annotation" / "boundingbox"
    _write(boxes / "train_00001_boundingbox.txt", "10.000000 8.000000 40.000000 38.000000 ")
    _write(boxes / "train_00003_boundingbox.txt", "10.0 8.0 40.0")
    source = sources.get_source("rafdb", root, "all", images="original", margin=0.0)
    assert [source[i]["key"] for i in range(len(source))] == [
        "Image/original/train_00001.jpg", "Image/original/train_00002.jpg"]
    crop, whole = source[0]["image"], source[1]["image"]
    assert crop.shape == (30, 30, 3) and crop.mean() > 230
    assert whole.shape == (48, 64, 3) and whole.mean() < 120
    assert source.skips.counts == collections.Counter({"unreadable face box": 1})


def test_rafdb_strict_stops_at_the_first_bad_row(raf_root):
    with pytest.raises(base.BadRecordError, match=r"list_patition_label.txt:9: unknown expr"):
        _read("rafdb", raf_root, strict=True)


# ----------------------------------------------------------------------------- FER2013 / FER+


def _pixels(k):
    return (np.arange(48 * 48) * (k + 1) % 256).astype(np.uint8).reshape(48, 48)


def _text(k):
    return " ".join(str(v) for v in _pixels(k).ravel())


FER_ROWS = [  # (emotion, Usage, pixels) of fer2013.csv; None: a bad row written as is
    ("0", "Training", 0), ("1", "Training", 1), ("2", "PublicTest", 2), ("3", "PrivateTest", 3),
    ("4", "Training", 4), ("5", "PublicTest", 5), ("6", "PrivateTest", 6),
    ("7", "Training", 7),                          # 7: unknown expression code
    ("3", "Training", "short"),                    # 8: 2303 pixel values
    ("3", "Training", "256"),                      # 9: a value over 255
    ("3", "Validation", 10),                       # 10: unknown usage
    None,                                          # 11: two fields
    ("2", "Training", "quoted"),                   # 12: pixels quoted (a re-export)
    ("x", "Training", 13),                         # 13: unknown expression code
    ("4", "Training", 14), ("4", "Training", 15), ("4", "Training", 16), ("4", "Training", 17),
    ("4", "Training", 18)]
FER_EXPECTED = [(0, A), (1, D), (2, F), (3, H), (4, S), (5, U), (6, N), (12, F), (14, S),
                (15, S), (16, S), (17, S), (18, S)]


def _fer_cells(k, row):
    if row is None:
        return ["3", "Training"]
    emotion, usage, pixels = row
    if pixels == "short":
        text = _text(k).rsplit(" ", 1)[0]
    elif pixels == "256":
        text = " ".join(["256"] + _text(k).split()[1:])
    elif pixels == "quoted":
        text = f'"{_text(k)}"'
    else:
        text = _text(k)
    return [emotion, text, usage]


def _fer_csv(path, icml=False, newline="\n"):
    lines = []
    for k, row in enumerate(FER_ROWS):
        cells = _fer_cells(k, row)
        if icml and len(cells) == 3:
            cells = [cells[0], cells[2], cells[1]]
        lines.append(",".join(cells))
    header = "emotion, Usage, pixels" if icml else "emotion,pixels,Usage"
    _write(path, "\n".join([header] + lines), newline)  # no newline at the end


FERPLUS_HEADER = ("Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,"
                  "contempt,unknown,NF")
# Row k labels fer2013.csv row k (docs/datasets.md#fer2013-and-fer; the first two verbatim).
# Comments: the label by FER+'s majority rule (the default), then by plurality where it differs.
FERPLUS_ROWS = [
    "Training,fer0000000.png,4,0,0,1,3,2,0,0,0,0",        # no majority (4 of 9); neutral
    "Training,fer0000001.png,6,0,1,1,0,0,0,0,2,0",        # neutral (6 of 8)
    "PublicTest,fer0000002.png,0,10,0,0,0,0,0,0,0,0",     # happiness
    "PrivateTest,fer0000003.png,0,0,6,0,0,0,4,0,0,0",     # surprise
    "Training,fer0000004.png,0,0,0,5,5,0,0,0,0,0",        # no majority; tied sadness / anger
    "PublicTest,fer0000005.png,0,0,0,0,0,4,0,6,0,0",      # contempt
    "PrivateTest,,0,0,0,0,0,0,0,0,0,10",                  # NF, empty name
    "Training,fer0000006.png,0,0,0,0,9,0,0,0,1,0",        # anger (FER2013 code 7 unused)
    "Training,fer0000007.png,0,0,0,0,0,8,0,0,0,0",        # disgust, FER2013 pixels short
    "Training,fer0000008.png,3,0,0,0,0,0,0,0,7,0",        # unknown
    "Validation,fer0000009.png,9,0,0,0,0,0,0,0,0,0",      # unknown usage (in both files)
    "Training,fer0000010.png,0,0,0,0,0,0,8,0,0,0",        # its FER2013 row has 2 fields
    "Training,fer0000011.png,0,0,0,0,0,0,7,0,0,0",        # fear, pixels quoted
    "Training,fer0000012.png,0,0,0,0,0,0,0,0,0,0",        # no votes
    "Training,fer0000013.png,1,0,0,0,0,0,0,0,0,9",        # NF with a name
    "Training,fer0000014.png,5,x,0,0,0,0,0,0,0,0",        # unreadable vote
    "Training,fer0000015.png,5,0,0",                      # wrong number of fields
    "Training,fer0000001.png,0,10,0,0,0,0,0,0,0,0",       # duplicated name
    "Training,fer0000016.png,5,0,0,0,0,0,0,5,0,0"]        # no majority; tied neutral / contempt
FERPLUS_EXPECTED = [("fer0000001.png", N, 1), ("fer0000002.png", H, 2),
                    ("fer0000003.png", U, 3), ("fer0000006.png", A, 7),
                    ("fer0000011.png", F, 12)]
FERPLUS_PLURALITY_EXPECTED = [("fer0000000.png", N, 0)] + FERPLUS_EXPECTED
FERPLUS_SKIPS = collections.Counter({
    "unreadable pixels": 1, "unknown usage": 1, "unreadable FER2013 row": 1,
    "unreadable votes": 1, "wrong number of fields": 1, "duplicated key": 1})


@pytest.fixture
def fer_root(tmp_path):
    _fer_csv(tmp_path / "fer2013" / "fer2013.csv")
    _write(tmp_path / "FERPlus" / "fer2013new.csv", "\n".join([FERPLUS_HEADER] + FERPLUS_ROWS)
           + "\n")
    return tmp_path


def test_fer2013_labels_pixels_and_skips(fer_root):
    table = _read("fer2013", fer_root)
    assert _rows(table) == [(f"fer2013/fer2013.csv/{k:05d}", e, NO_AU, -1, "")
                            for k, e in FER_EXPECTED]
    pixels = table.columns()["pixels"]
    for (k, _), array in zip(FER_EXPECTED, pixels):
        assert array.dtype == np.uint8 and np.array_equal(array, _pixels(k))
    assert table.skips.counts == collections.Counter({
        "unknown expression code": 2, "unreadable pixels": 2, "unknown usage": 1,
        "wrong number of fields": 1})
    assert "fer2013.csv:9:" in table.skips.first["unknown expression code"][0]
    source = sources.get_source("fer2013", fer_root, "test")
    record = source[0]
    schema.validate_record(record)
    assert record["image"].shape == (48, 48, 3) and record["expression"] == H
    assert np.array_equal(record["image"][..., 1], _pixels(3))


def test_fer2013_usage_splits(fer_root):
    parts = _check_splits("fer2013", fer_root)
    index = {s: [int(k.rsplit("/", 1)[1]) for k in keys] for s, keys in parts.items()}
    assert index == {"train": [0, 1, 4, 12, 14, 15, 16, 17, 18], "validation": [2, 5],
                     "test": [3, 6]}


def test_fer2013_icml_header_and_crlf(tmp_path):
    _fer_csv(tmp_path / "icml_face_data.csv", icml=True, newline="\r\n")
    table = _read("fer2013", tmp_path)
    assert _rows(table) == [(f"icml_face_data.csv/{k:05d}", e, NO_AU, -1, "")
                            for k, e in FER_EXPECTED]
    assert np.array_equal(table.columns()["pixels"][-1], _pixels(18))


def test_fer2013_wrong_root_header_and_strict(fer_root, tmp_path_factory):
    with pytest.raises(base.DatasetError, match="fer2013.csv"):
        _read("fer2013", fer_root / "FERPlus")
    bad = tmp_path_factory.mktemp("bad")
    _write(bad / "fer2013.csv", "label,pixels,Usage\n0,1 2,Training\n")
    with pytest.raises(base.DatasetError, match="lacks emotion"):
        _read("fer2013", bad)
    with pytest.raises(base.BadRecordError, match=r"fer2013.csv:9: unknown expression code"):
        _read("fer2013", fer_root, strict=True)


def test_ferplus_majority_vote_and_skips(fer_root):
    table = _read("ferplus", fer_root)
    assert _rows(table) == [(name, e, NO_AU, -1, "") for name, e, _ in FERPLUS_EXPECTED]
    for (_, _, k), array in zip(FERPLUS_EXPECTED, table.columns()["pixels"]):
        assert np.array_equal(array, _pixels(k))
    assert table.skips.counts == FERPLUS_SKIPS
    # FER+'s own labels outside the 7 expressions are left out by policy, not errors.
    assert table.skips.dropped == collections.Counter({
        "no majority vote": 3, "majority vote contempt": 1, "no image name": 1,
        "majority vote unknown": 1, "no votes": 1, "majority vote not a face": 1})
    assert "fer2013.csv:10" in table.skips.first["unreadable pixels"][0]
    assert sources.reader_options("ferplus") == {"vote": "majority"}


def test_ferplus_plurality_vote(fer_root):
    table = _read("ferplus", fer_root, vote="plurality")
    assert _rows(table) == [(name, e, NO_AU, -1, "")
                            for name, e, _ in FERPLUS_PLURALITY_EXPECTED]
    assert table.skips.counts == FERPLUS_SKIPS
    assert table.skips.dropped == collections.Counter({
        "tied votes": 2, "plurality vote contempt": 1, "no image name": 1,
        "plurality vote unknown": 1, "no votes": 1, "plurality vote not a face": 1})


# Votes (neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF) ->
# the label by the majority rule and by plurality: an expression, or the reason it is left out.
FERPLUS_VOTE_RULES = [
    ("5,1,1,1,1,1,0,0,0,0", N, N),                     # 5 of 10, but of 5 once singles go
    ("2,1,1,1,1,1,1,1,1,0", N, N),                     # the only count above 1
    ("4,0,0,0,0,0,0,0,2,2", "no majority vote", N),    # unknown and NF votes count: 4 of 8
    ("5,0,3,0,0,0,0,0,2,0", "no majority vote", N),    # exactly half is not more than half
    ("3,2,2,2,0,0,0,0,0,1", "no majority vote", N),    # 3 of 9
    ("0,0,0,0,6,0,0,0,4,0", A, A),
    ("1,1,1,1,1,1,1,1,1,1", "no majority vote", "tied votes"),
    ("0,0,0,0,0,0,0,6,4,0", "majority vote contempt", "plurality vote contempt"),
    ("0,3,0,0,0,0,0,0,7,0", "majority vote unknown", "plurality vote unknown"),
    ("0,0,0,0,0,0,2,0,0,8", "majority vote not a face", "plurality vote not a face"),
    ("0,0,0,0,0,0,0,0,0,0", "no votes", "no votes"),
]


def test_ferplus_vote_rules(tmp_path):
    _write(tmp_path / "fer2013.csv", "\n".join(
        ["emotion,pixels,Usage"] + [f"0,{_text(k)},Training" for k in range(len(
            FERPLUS_VOTE_RULES))]) + "\n")
    _write(tmp_path / "fer2013new.csv", "\n".join(
        [FERPLUS_HEADER] + [f"Training,fer{k:07d}.png,{votes}"
                            for k, (votes, _, _) in enumerate(FERPLUS_VOTE_RULES)]) + "\n")
    for column, vote in ((1, "majority"), (2, "plurality")):
        table = _read("ferplus", tmp_path, vote=vote)
        labels = dict(zip(_keys(table), table.columns()["expression"].tolist()))
        assert labels == {f"fer{k:07d}.png": rule[column]
                          for k, rule in enumerate(FERPLUS_VOTE_RULES)
                          if isinstance(rule[column], int)}, vote
        assert table.skips.dropped == collections.Counter(
            rule[column] for rule in FERPLUS_VOTE_RULES if isinstance(rule[column], str)), vote
        assert not table.skips.counts
    with pytest.raises(base.DatasetError) as error:
        sources.get_source("ferplus", tmp_path, "train", vote="most")
    assert str(error.value) == ("ferplus: option vote must be 'majority' (FER+'s own rule) or "
                                "'plurality', got 'most'")


def test_ferplus_splits(fer_root):
    parts = _check_splits("ferplus", fer_root)
    assert parts == {"train": ["fer0000001.png", "fer0000006.png", "fer0000011.png"],
                     "validation": ["fer0000002.png"], "test": ["fer0000003.png"]}


def test_ferplus_files_must_be_row_aligned(fer_root):
    labels = fer_root / "FERPlus" / "fer2013new.csv"
    _write(labels, "\n".join([FERPLUS_HEADER] + FERPLUS_ROWS[:-1]))
    with pytest.raises(base.DatasetError, match="fer2013.csv has more rows"):
        _read("ferplus", fer_root)
    _write(labels, "\n".join([FERPLUS_HEADER] + FERPLUS_ROWS + [FERPLUS_ROWS[0]]))
    with pytest.raises(base.DatasetError, match="fer2013new.csv has more rows"):
        _read("ferplus", fer_root)
    _write(labels, "\n".join([FERPLUS_HEADER, FERPLUS_ROWS[0].replace("Training", "PublicTest")]
                             + FERPLUS_ROWS[1:]))
    with pytest.raises(base.DatasetError, match="not row-aligned"):
        _read("ferplus", fer_root, split="test")


def test_ferplus_wrong_root_and_strict(fer_root):
    with pytest.raises(base.DatasetError, match="fer2013new.csv"):
        _read("ferplus", fer_root / "fer2013")
    (fer_root / "fer2013" / "fer2013.csv").unlink()
    with pytest.raises(base.DatasetError, match="fer2013.csv"):
        _read("ferplus", fer_root)


def test_ferplus_strict_stops_at_the_first_bad_row(fer_root):
    # No majority (lines 2 and 6) is a policy drop; the first bad data is the short pixel row.
    with pytest.raises(base.BadRecordError, match=r"fer2013.csv:10: unreadable pixels"):
        _read("ferplus", fer_root, strict=True)


# ---------------------------------------------------------------------------------------- ExpW

RED, BLUE = (255, 0, 0), (0, 0, 255)
EXPW_LINES = [
    "angry_actor_104.jpg 0 28 113 226 141 22.9362 0",   # verbatim (docs/datasets.md#expw)
    "angry_actor_104.jpg 1 10 5 60 70 3.5 3",
    "disgust_a_1.jpg 0 1 2 12 14 40.0 1",
    "fear_a_1.jpg 0 1 2 12 14 40.0 2",
    "sad_a_1.jpg 0 1 2 12 14 40.0 4",
    "surprise_a_1.jpg 0 1 2 12 14 40.0 5",
    "neutral_a_1.jpg 0 1 2 12 14 40.0 6",
    "neutral_a_1.jpg 1 0 0 16 16 41.0 6",
    "happy_a_1.jpg 0 1 2 12 14 9.5 7",                  # unknown expression code
    "happy_a_2.jpg 0 1 2 12 14 9.5 -1",                 # unknown expression code
    "happy_a_3.jpg 0 1 2 12 14 9.5",                    # 7 fields
    "happy_a_4.jpg 0 1 12 2 14 9.5 3",                  # right < left
    "happy_a_5.jpg 0 1 2 12 14 nan 3",                  # confidence NaN
    "happy_a_6.jpg 0 1 2 x 14 9.5 3",                   # not a number
    "disgust_a_1.jpg 0 1 2 12 14 40.0 1",               # duplicated face
    "missing.jpg 0 1 2 12 14 40.0 3",                   # no image file
    "happy_a_7.jpg 0 1 2 12 14 9.5 3"]
EXPW_EXPECTED = [("angry_actor_104.jpg/0", A), ("angry_actor_104.jpg/1", H),
                 ("disgust_a_1.jpg/0", D), ("fear_a_1.jpg/0", F), ("sad_a_1.jpg/0", S),
                 ("surprise_a_1.jpg/0", U), ("neutral_a_1.jpg/0", N), ("neutral_a_1.jpg/1", N),
                 ("happy_a_7.jpg/0", H)]


@pytest.fixture
def expw_root(tmp_path):
    root = tmp_path / "ExpW"
    _write(root / "label" / "label.lst", "\n".join(EXPW_LINES) + "\n", "\r\n")
    origin = root / "image" / "origin"
    _image(origin / "angry_actor_104.jpg", (240, 160), (0, 0, 0),
           [(113, 28, 226, 141, RED), (5, 10, 60, 70, BLUE)])
    for line in EXPW_LINES[2:]:
        name = line.split()[0]
        if name != "missing.jpg":
            _image(origin / name)
    return root


def test_expw_faces_labels_and_boxes(expw_root):
    table = _read("expw", expw_root)
    assert _rows(table) == [(k, e, NO_AU, -1, k.split("/")[0]) for k, e in EXPW_EXPECTED]
    boxes = table.columns()["box"]
    assert boxes[0].tolist() == [113, 28, 226, 141] and boxes[1].tolist() == [5, 10, 60, 70]
    assert table.skips.counts == collections.Counter({
        "unknown expression code": 2, "wrong number of fields": 1, "unreadable face box": 3,
        "duplicated key": 1, "image file not found": 1})
    source = sources.get_source("expw", expw_root, "all", margin=0.0)
    red, blue = source[0]["image"], source[1]["image"]
    assert red.shape == (113, 113, 3) and red[..., 0].mean() > 230 and red[..., 2].mean() < 20
    assert blue.shape == (60, 60, 3)
    assert blue[..., 2].mean() > 200 and blue[..., 0].mean() < 20
    for i in range(len(source)):
        schema.validate_record(source[i])


def test_expw_min_confidence(expw_root):
    keys = _keys(_read("expw", expw_root, min_confidence=10.0))
    assert keys == [k for k, _ in EXPW_EXPECTED if k not in ("angry_actor_104.jpg/1",
                                                           "happy_a_7.jpg/0")]


def test_expw_split_by_image(expw_root):
    parts = _check_splits("expw", expw_root, validation_fraction=0.3, test_fraction=0.3)
    for split, keys in parts.items():
        for key in keys:
            assert base.subject_split(key.split("/")[0], 0, 0.3, 0.3) == split
    assert all(parts.values())
    images = {s: {k.split("/")[0] for k in keys} for s, keys in parts.items()}
    assert not (images["train"] & images["validation"] or images["train"] & images["test"]
                or images["validation"] & images["test"])


def test_expw_wrong_root_and_strict(expw_root, tmp_path):
    with pytest.raises(base.DatasetError, match="label/label.lst"):
        _read("expw", expw_root / "image")
    with pytest.raises(base.BadRecordError, match=r"label.lst:9: unknown expression code"):
        _read("expw", expw_root, strict=True)


# ---------------------------------------------------------------------------------------- CK+

def _sci(*values):
    return "".join(f"{v:16.7e}" for v in values)  # "   3.0000000e+00": leading spaces


def _landmarks(x0=10.0, y0=8.0, side=30.0, tilt=0.0):
    """68 points in a side x side square at (x0, y0); the eyes (36-47) at mid-height + tilt."""
    t = np.linspace(0.0, 1.0, 68)
    points = np.stack([x0 + side * t, y0 + side * ((t * 7) % 1.0)], axis=1)
    points[36:42] = [x0 + 8, y0 + 12]
    points[42:48] = [x0 + 22, y0 + 12 + tilt]
    points[0], points[1] = [x0, y0], [x0 + side, y0 + side]
    return points


def _ck_sequence(root, subject, seq, frames=3, emotion=None, facs=None, landmarks="peak"):
    """A sequence; `emotion` and `facs` are file texts (None: no file)."""
    folder = root / "cohn-kanade-images" / subject / seq
    for k in range(1, frames + 1):
        _image(folder / f"{subject}_{seq}_{k:08d}.png", (64, 48), (0, 0, 0),
               [(10, 8, 40, 38, (255, 255, 255))])
    peak = f"{subject}_{seq}_{frames:08d}"
    if emotion is not None:
        _write(root / "Emotion_labels" / "Emotion" / subject / seq / f"{peak}_emotion.txt",
               emotion)
    if facs is not None:
        _write(root / "FACS" / subject / seq / f"{peak}_facs.txt", facs)
    marks = {"peak": [frames], "both": [1, frames], "none": []}.get(landmarks)
    for k in marks if marks is not None else []:
        _write(root / "Landmarks" / subject / seq / f"{subject}_{seq}_{k:08d}_landmarks.txt",
               "\n".join(_sci(x, y) for x, y in _landmarks()) + "\n")
    if marks is None:  # a text of its own: a malformed file
        _write(root / "Landmarks" / subject / seq / f"{peak}_landmarks.txt", landmarks)
    return f"cohn-kanade-images/{subject}/{seq}/{subject}_{seq}_"


def _au(**present):
    """The 17-AU list with AU<n>=value for the given AUs and 0 for every other AU."""
    values = {au: 0 for au in taxonomy.AUS} | {int(k[2:]): v for k, v in present.items()}
    return base.au_vector(values).tolist()


@pytest.fixture
def ck_root(tmp_path):
    root = tmp_path / "CK+"
    facs_9_17 = _sci(9, 4) + "\n" + _sci(17, 2) + "\n" + _sci(62, 0) + "\n"
    p = {}
    p["disgust"] = _ck_sequence(root, "S005", "001", 3, _sci(3) + "\n", facs_9_17, "both")
    p["contempt"] = _ck_sequence(root, "S005", "002", 2, _sci(2), _sci(14, 3) + "\n")
    p["facs_only"] = _ck_sequence(root, "S005", "003", 2, None, _sci(12, 0) + "\n" + _sci(6, 0))
    p["surprise"] = _ck_sequence(root, "S010", "001", 4, _sci(7) + "\r\n",
                                 "\r\n".join(_sci(au, 0) for au in (1, 2, 5, 25, 26)),
                                 "none")
    p["happy"] = _ck_sequence(root, "S011", "004", 2, "  " + _sci(5) + "\n\n", None)
    _ck_sequence(root, "S011", "005", 2, _sci(2), None)            # contempt, no FACS
    _ck_sequence(root, "S022", "001", 2, _sci(8), _sci(1, 0))       # unknown code
    _ck_sequence(root, "S022", "002", 2, _sci(5, 1), _sci(1, 0))    # two numbers
    _ck_sequence(root, "S022", "003", 2, _sci(4.5), None)           # not an integer
    _ck_sequence(root, "S022", "004", 2, _sci(4), _sci(1, 0, 3))    # FACS with 3 columns
    _ck_sequence(root, "S022", "005", 2, _sci(4), "")               # empty FACS file
    _ck_sequence(root, "S022", "006", 2, _sci(4), _sci(1.5, 0))     # AU 1.5
    _ck_sequence(root, "S022", "007", 2, _sci(4), _sci(1, 0), _sci(1, 2) + "\n")  # 1 point
    _ck_sequence(root, "S050", "001", 2, _sci(1), _sci(4, 0) + "\n" + _sci(7, 0))
    _ck_sequence(root, "S051", "001", 2, _sci(6), _sci(15, 0))
    _ck_sequence(root, "S052", "001", 2, _sci(0), _sci(25, 0))      # neutral code 0
    _write(root / "Emotion_labels" / "Emotion" / "S060" / "001" / "S060_001_00000009_emotion.txt",
           _sci(4))                                                  # no image
    return root, p


def _ck_expected(p):
    return [
        (p["disgust"] + "00000003.png", D, _au(AU9=1, AU17=1), -1, "S005"),
        (p["contempt"] + "00000002.png", -1, _au(AU14=1), -1, "S005"),
        (p["facs_only"] + "00000002.png", -1, _au(AU12=1, AU6=1), -1, "S005"),
        (p["surprise"] + "00000004.png", U, _au(AU1=1, AU2=1, AU5=1, AU25=1, AU26=1), -1,
         "S010"),
        (p["happy"] + "00000002.png", H, NO_AU, -1, "S011"),
        ("cohn-kanade-images/S050/001/S050_001_00000002.png", A, _au(AU4=1, AU7=1), -1, "S050"),
        ("cohn-kanade-images/S051/001/S051_001_00000002.png", S, _au(AU15=1), -1, "S051"),
        ("cohn-kanade-images/S052/001/S052_001_00000002.png", N, _au(AU25=1), -1, "S052")]


def test_ckplus_labels_and_skips(ck_root, caplog):
    root, p = ck_root
    with caplog.at_level(logging.INFO, logger="fbnet.data"):
        table = _read("ckplus", root)
    assert _rows(table) == _ck_expected(p)
    assert table.skips.counts == collections.Counter({
        "unreadable emotion file": 3, "unreadable FACS file": 3,
        "unreadable landmarks file": 1, "image file not found": 1})
    assert table.skips.dropped == collections.Counter({"contempt without FACS file": 1})
    assert "1 contempt sequence(s) kept" in caplog.text
    assert "1 frame(s) have no landmarks file" in caplog.text
    landmarks = table.columns()["landmarks"]
    assert sorted(landmarks) == [0, 1, 2, 4, 5, 6, 7]  # all but S010, which has no file
    assert np.allclose(landmarks[0], _landmarks(), atol=1e-4)


def test_ckplus_neutral_first_frame(ck_root):
    root, p = ck_root
    table = _read("ckplus", root, neutral_first_frame=True)
    expected = _ck_expected(p)
    first = {0: p["disgust"], 1: p["contempt"], 3: p["surprise"], 4: p["happy"]}
    rows = []
    for k, row in enumerate(expected):
        rows.append(row)
        if k in first:
            rows.append((first[k] + "00000001.png", N, NO_AU, -1, row[4]))
        elif k >= 5:
            rows.append((row[0][:-5] + "1.png", N, NO_AU, -1, row[4]))
    assert _rows(table) == rows
    # Peaks have landmark files, but of the first frames only S005/001's (row 1), and S010
    # (rows 5, 6) has none.
    assert sorted(table.columns()["landmarks"]) == [0, 1, 2, 4, 7, 9, 11, 13]


def test_ckplus_crop_on_landmarks(ck_root):
    root, _ = ck_root
    source = sources.get_source("ckplus", root, "all", margin=0.0)
    face, whole = source[0]["image"], source[3]["image"]
    assert face.shape == (30, 30, 3) and face.mean() > 230
    assert whole.shape == (48, 64, 3)
    for i in range(len(source)):
        schema.validate_record(source[i])


def test_ckplus_split_by_subject(ck_root):
    root, _ = ck_root
    parts = _check_splits("ckplus", root, validation_fraction=0.3, test_fraction=0.3, seed=1)
    for split, keys in parts.items():
        for key in keys:
            assert base.subject_split(key.split("/")[1], 1, 0.3, 0.3) == split
    assert all(parts.values())


def test_ckplus_wrong_root_missing_labels_and_strict(ck_root, tmp_path):
    root, _ = ck_root
    with pytest.raises(base.DatasetError, match="cohn-kanade-images"):
        _read("ckplus", tmp_path / "CK+" / "FACS")
    images_only = tmp_path / "images_only"
    _image(images_only / "cohn-kanade-images" / "S005" / "001" / "S005_001_00000001.png")
    with pytest.raises(base.DatasetError, match="Emotion.*FACS"):
        _read("ckplus", images_only)
    # Contempt (S011) is a policy drop; the first bad data is S022's code 8.
    with pytest.raises(base.BadRecordError,
                       match=r"S022_001_00000002_emotion.txt: unreadable emotion file"):
        _read("ckplus", root, strict=True)
