"""The shared machinery of dataset sources (base.py) and the `manifest` format."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from data_pipelines import schema
from data_pipelines.sources import BadRecordError, DatasetError, base, get_source
from fbnet_jax.core import taxonomy


def _save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _gradient(h=12, w=16):
    return (np.arange(h * w * 3).reshape(h, w, 3) % 251).astype(np.uint8)


# --- images ---------------------------------------------------------------------------------

def test_read_image_converts_every_mode_to_uint8_rgb(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    cases = {
        "grey.png": (Image.fromarray(grey), np.repeat(grey[..., None], 3, -1)),
        "rgba.png": (Image.fromarray(np.dstack([_gradient(6, 8), np.zeros((6, 8), np.uint8)])),
                     _gradient(6, 8)),
        "palette.png": (Image.fromarray(_gradient(6, 8)).quantize(colors=4), None),
        "sixteen.png": (Image.fromarray(grey.astype(np.uint16) * 257), np.repeat(
            grey[..., None], 3, -1)),
        "cmyk.jpg": (Image.fromarray(_gradient(6, 8)).convert("CMYK"), None),
    }
    for name, (image, expected) in cases.items():
        image.save(tmp_path / name)
        out = base.read_image((tmp_path / name).read_bytes(), name)
        assert out.dtype == np.uint8 and out.shape == (6, 8, 3), name
        if expected is not None:
            np.testing.assert_array_equal(out, expected, err_msg=name)
    palette = Image.open(tmp_path / "palette.png")
    np.testing.assert_array_equal(base.read_image((tmp_path / "palette.png").read_bytes(), "p"),
                                  np.asarray(palette.convert("RGB")))


@pytest.mark.parametrize("data, message", [
    (b"", "empty file"),
    (b"not an image at all", "not a readable image"),
])
def test_read_image_refuses_what_is_not_an_image(data, message):
    with pytest.raises(DatasetError, match=f"^where.jpg: {message}"):
        base.read_image(data, "where.jpg")


def test_read_image_refuses_a_truncated_jpeg(tmp_path):
    path = _save(tmp_path / "a.jpg", _gradient(64, 64))
    with pytest.raises(DatasetError, match="a.jpg: not a readable image"):
        base.read_image(path.read_bytes()[:-200], "a.jpg")


def test_crop_face_is_square_with_margin_and_replicates_the_border():
    image = np.zeros((40, 60, 3), np.uint8)
    image[10:20, 30:40] = 200  # the "face": a 10 x 10 square
    crop = base.crop_face(image, np.array([30, 10, 40, 20], np.float32), margin=0.5)
    assert crop.shape == (20, 20, 3)
    np.testing.assert_array_equal(crop[5:15, 5:15], 200)
    assert crop[:5].max() == 0 and crop[15:].max() == 0
    edge = base.crop_face(image, np.array([50, 0, 60, 10], np.float32), margin=0.0)
    assert edge.shape == (10, 10, 3)


def test_crop_face_levels_the_eyes_from_68_landmarks():
    image = np.zeros((101, 101, 3), np.uint8)
    image[38:43, 28:33, 0] = 255  # left eye at (x 30, y 40), in the red channel
    image[78:83, 68:73, 1] = 255  # right eye at (70, 80): 45 degrees down to the right
    landmarks = np.zeros((68, 2), np.float32)
    landmarks[36:42] = (30, 40)
    landmarks[42:48] = (70, 80)
    crop = base.crop_face(image, np.array([0, 0, 100, 100], np.float32), 0.0, landmarks)

    def centre(channel):
        ys, xs = np.nonzero(crop[..., channel] > 128)
        return xs.mean(), ys.mean()

    (lx, ly), (rx, ry) = centre(0), centre(1)
    assert abs(ly - ry) < 0.5 and lx < rx
    assert abs((rx - lx) - 40 * math.sqrt(2)) < 1.0
    level = base.crop_face(image, np.array([0, 0, 100, 100], np.float32), 0.0)
    np.testing.assert_array_equal(level, image[:100, :100])


def test_au_vector_and_projection():
    vector = base.au_vector({12: 1, 4: 0, 11: 1, 27: 1})
    expected = np.full(17, -1, np.int8)
    expected[taxonomy.AUS.index(12)] = 1
    expected[taxonomy.AUS.index(4)] = 0
    np.testing.assert_array_equal(vector, expected)
    np.testing.assert_array_equal(base.project_aus(vector, (12, 11, 4)), [1, -1, 0])


def test_subject_split_is_stable_and_covers_the_fractions():
    groups = [f"S{k:03d}" for k in range(2000)]
    splits = [base.subject_split(g, 7, 0.1, 0.2) for g in groups]
    counts = {s: splits.count(s) for s in ("train", "validation", "test")}
    assert abs(counts["test"] / 2000 - 0.2) < 0.03 and abs(counts["validation"] / 2000 - 0.1) < 0.03
    assert [base.subject_split(g, 7, 0.1, 0.2) for g in groups[:50]] == splits[:50]
    assert splits != [base.subject_split(g, 8, 0.1, 0.2) for g in groups]


def test_find_file_searches_nested_copies_and_names_what_it_looked_for(tmp_path):
    (tmp_path / "RAF" / "basic" / "EmoLabel").mkdir(parents=True)
    target = tmp_path / "RAF" / "basic" / "EmoLabel" / "x.txt"
    target.write_text("")
    assert base.find_file(tmp_path / "RAF", ["EmoLabel/x.txt"], "d", "labels") == target
    with pytest.raises(DatasetError, match=r"^d: found no labels under .*looked for .*y.txt"):
        base.find_file(tmp_path, ["EmoLabel/y.txt"], "d", "labels")
    with pytest.raises(DatasetError, match="is not a folder"):
        base.find_file(tmp_path / "nope", ["x"], "d", "labels")


def test_read_lines_accepts_crlf_bom_and_no_final_newline(tmp_path):
    path = tmp_path / "l.txt"
    path.write_bytes(b"\xef\xbb\xbfa 1\r\nb 2\nc 3")
    assert base.read_lines(path) == ["a 1", "b 2", "c 3"]
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(DatasetError, match="l.txt: not UTF-8"):
        base.read_lines(path)


# --- the manifest ---------------------------------------------------------------------------

def _manifest(tmp_path, header, rows, name="manifest.csv"):
    for k in range(6):
        _save(tmp_path / "img" / f"{k}.jpg", np.full((8, 8, 3), 40 * k, np.uint8))
    text = "\n".join([",".join(header)] + [",".join(r) for r in rows])
    (tmp_path / name).write_text(text)
    return tmp_path / name


def _au(**labels):
    return base.au_vector({int(k[2:]): v for k, v in labels.items()}).tolist()


def _summary(source):
    return [(r["key"], int(r["expression"]), r["au"].tolist(),
             None if np.isnan(r["va"]).any() else r["va"].round(4).tolist())
            for r in (source[i] for i in range(len(source)))]


def test_manifest_labels_every_record_exactly(tmp_path):
    _manifest(tmp_path, ["path", "expression", "AU12", "AU 4", "AU11", "valence", "arousal"], [
        ["img/0.jpg", "Happiness", "1", "0", "1", "0.5", "-0.25"],
        ["img/1.jpg", "3", "", "", "", "", ""],
        ["img/2.jpg", "", "0", "", "", "", ""],
        ["img/3.jpg", "surprise", "", "", "", "-1", "1"],
    ])
    source = get_source("manifest", tmp_path, "all")
    assert _summary(source) == [
        ("img/0.jpg", 4, _au(AU12=1, AU4=0), [0.5, -0.25]),
        ("img/1.jpg", 3, _au(), None),
        ("img/2.jpg", -1, _au(AU12=0), None),
        ("img/3.jpg", 6, _au(), [-1.0, 1.0]),
    ]
    assert source.skips.total == 0
    record = source[0]
    schema.validate_record(record)
    assert record["image"].shape == (8, 8, 3) and record["source"] == 0


def test_manifest_skips_and_counts_every_bad_row(tmp_path):
    manifest = _manifest(tmp_path, ["path", "expression", "AU12", "valence", "arousal"], [
        ["img/0.jpg", "4", "", "", ""],      # line 2: fine
        ["img/1.jpg", "7", "", "", ""],      # 3: unknown expression code
        ["img/2.jpg", "", "2", "", ""],      # 4: AU value not 0/1
        ["img/3.jpg", "", "", "0.5", ""],    # 5: valence without arousal
        ["img/4.jpg", "", "", "nan", "0"],   # 6: NaN
        ["img/5.jpg", "", "", "1.5", "0"],   # 7: out of range
        ["img/9.jpg", "1", "", "", ""],      # 8: no such image
        ["img/0.jpg", "2", "", "", ""],      # 9: duplicated key
        ["", "2", "", "", ""],               # 10: no path
        ["img/1.jpg", "", "", "", ""],       # 11: no label at all
        ["img/1.jpg", "2"],                  # 12: wrong number of cells
    ])
    source = get_source("manifest", tmp_path, "all")
    assert [r[0] for r in _summary(source)] == ["img/0.jpg"]
    assert dict(source.skips.counts) == {
        "unreadable label": 5, "image file not found": 1, "duplicated key": 1,
        "no image path": 1, "no label": 1, "unreadable manifest row": 1}
    assert source.skips.first["image file not found"] == [
        f"{manifest}:8: image file not found ({tmp_path}/img/9.jpg)"]
    assert source.skips.first["unreadable label"][0] == (
        f"{manifest}:3: unreadable label (expression '7' is not 0..6 or an expression name)")
    with pytest.raises(BadRecordError, match=f"{manifest}:3: unreadable label"):
        get_source("manifest", tmp_path, "all", strict=True)


def test_manifest_splits_by_subject_or_by_its_split_column(tmp_path):
    rows = [[f"img/{k}.jpg", str(k % 7), f"S{k % 3}"] for k in range(6)]
    _manifest(tmp_path, ["path", "expression", "subject"], rows)
    # A seed that puts the three subjects in three different splits.
    seed = next(s for s in range(100) if len({base.subject_split(f"S{k}", s, 0.3, 0.4)
                                              for k in range(3)}) == 3)
    parts = {s: [r[0] for r in _summary(get_source("manifest", tmp_path, s, test_fraction=0.4,
                                                   validation_fraction=0.3, seed=seed))]
             for s in ("train", "validation", "test")}
    everything = sorted(sum(parts.values(), []))
    assert everything == [f"img/{k}.jpg" for k in range(6)]
    for split, keys in parts.items():
        subjects = {int(k[4]) % 3 for k in keys}
        expected = {k for k in range(3) if base.subject_split(f"S{k}", seed, 0.3, 0.4) == split}
        assert subjects == expected, split
    _manifest(tmp_path, ["path", "expression", "split"],
              [["img/0.jpg", "1", "test"], ["img/1.jpg", "1", "train"], ["img/2.jpg", "1", "tst"]])
    test = get_source("manifest", tmp_path, "test")
    assert [r[0] for r in _summary(test)] == ["img/0.jpg"]
    assert dict(get_source("manifest", tmp_path, "train").skips.counts) == {"unknown split": 1}


def test_manifest_jsonl_and_face_boxes(tmp_path):
    image = np.zeros((40, 40, 3), np.uint8)
    image[10:20, 10:20] = 255
    _save(tmp_path / "faces" / "a.png", image)
    lines = [{"path": "faces/a.png", "expression": 0, "x0": 10, "y0": 10, "x1": 20, "y1": 20},
             {"path": "faces/a.png", "expression": 1}, "[1, 2]"]
    (tmp_path / "data.jsonl").write_text("\n".join(
        json.dumps(x) if isinstance(x, dict) else x for x in lines))
    source = get_source("manifest", tmp_path / "data.jsonl", "all", margin=0.0)
    assert len(source) == 1 and source[0]["image"].shape == (10, 10, 3)
    assert source[0]["image"].min() == 255
    assert dict(source.skips.counts) == {"duplicated key": 1, "unreadable manifest row": 1}


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="neither a manifest file nor a folder"):
        get_source("manifest", tmp_path, "all")
    (tmp_path / "manifest.csv").write_text("file,expression\na.jpg,1\n")
    with pytest.raises(DatasetError, match=r"manifest.csv: the header has no 'path' column"):
        get_source("manifest", tmp_path, "all")
    (tmp_path / "manifest.csv").write_text("")
    with pytest.raises(DatasetError, match="manifest.csv: empty manifest"):
        get_source("manifest", tmp_path, "all")


def test_get_source_rejects_unknown_names_splits_and_options(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'rafdbb'; known: affectnet, "):
        get_source("rafdbb", tmp_path, "train")
    with pytest.raises(DatasetError, match="manifest: no split 'tset'; it has train, validation"):
        get_source("manifest", tmp_path, "tset")
    with pytest.raises(DatasetError, match=r"manifest: unknown option\(s\) sede; its options: "
                                           r"validation_fraction \(default 0.1\)"):
        get_source("manifest", tmp_path, "train", sede=1)
    _manifest(tmp_path, ["path", "expression"], [["img/0.jpg", "9"]])
    with pytest.raises(DatasetError, match="no usable record for split 'all'.*1 unreadable label"):
        get_source("manifest", tmp_path, "all")
    # fbnet prepare asks for the empty split itself, to write the others.
    empty = get_source("manifest", tmp_path, "all", allow_empty=True)
    assert len(empty) == 0 and dict(empty.skips.counts) == {"unreadable label": 1}
    with pytest.raises(ValueError, match="allow_empty applies to dataset folders"):
        get_source("prepared", tmp_path, "train", dataset="manifest", allow_empty=True)


def test_unreadable_images_follow_the_policy(tmp_path):
    _manifest(tmp_path, ["path", "expression"], [[f"img/{k}.jpg", str(k)] for k in range(3)])
    (tmp_path / "img" / "1.jpg").write_bytes(b"\xff\xd8\xff broken")
    after = get_source("manifest", tmp_path, "all")
    record = after[1]
    assert record["key"] == "img/2.jpg" and int(record["expression"]) == 2
    assert after[2]["key"] == "img/2.jpg" and after.unreadable_count == 1
    masked = get_source("manifest", tmp_path, "all", unreadable="mask")
    record = masked[1]
    assert record["key"] == "" and int(record["expression"]) == -1
    assert (record["au"] == -1).all() and all(math.isnan(v) for v in record["va"])
    with pytest.raises(DatasetError, match=r"img/1.jpg: not a readable image"):
        get_source("manifest", tmp_path, "all", unreadable="raise")[1]
    with pytest.raises(DatasetError, match=r"img/1.jpg: not a readable image"):
        get_source("manifest", tmp_path, "all", strict=True)[1]


def test_sources_project_aus_and_set_the_source_index(tmp_path):
    _manifest(tmp_path, ["path", "AU12", "AU4"], [["img/0.jpg", "1", "0"]])
    source = get_source("manifest", tmp_path, "all", aus=(4, 11, 12), source_index=3)
    assert source[0]["au"].tolist() == [0, -1, 1] and int(source[0]["source"]) == 3


def test_labels_give_a_records_labels_without_its_image(tmp_path):
    _manifest(tmp_path, ["path", "expression", "AU12", "valence", "arousal"], [
        ["img/0.jpg", "1", "1", "0.5", "0.5"], ["img/1.jpg", "", "0", "", ""]])
    source = get_source("manifest", tmp_path, "all", source_index=2)
    (tmp_path / "img" / "0.jpg").unlink()  # labels() must not read the image
    for index in range(2):
        labels, record = source.labels(index), source[1] if index else None
        assert labels["key"] == f"img/{index}.jpg" and int(labels["source"]) == 2
        if record is not None:
            for field in ("expression", "au", "compound"):
                np.testing.assert_array_equal(labels[field], record[field])
            np.testing.assert_array_equal(labels["va"], record["va"])
    first = source.labels(0)
    assert int(first["expression"]) == 1 and first["va"].tolist() == [0.5, 0.5]


def test_policy_drops_are_counted_apart_and_never_strict():
    skips = base.Skips("d[train]", strict=True)
    skips.drop("contempt", "f.csv:3")
    skips.drop("contempt", "f.csv:4")
    assert skips.total == 0 and dict(skips.dropped) == {"contempt": 2}
    assert skips.summary() == "d[train]: no record skipped; left out by label policy: 2 contempt"
    with pytest.raises(BadRecordError, match=r"^d\[train\]: f.csv:5: bad code \(9\)"):
        skips.skip("bad code", "f.csv:5", "9")


def test_notes_count_kept_records_and_end_the_summary():
    skips = base.Skips("d[train]", strict=True)
    skips.note("automatic labels")
    skips.note("automatic labels", 2)
    skips.drop("contempt", "f.csv:3")
    assert skips.total == 0 and dict(skips.noted) == {"automatic labels": 3}
    assert skips.summary() == ("d[train]: no record skipped; left out by label policy: "
                               "1 contempt; noted: 3 automatic labels")
