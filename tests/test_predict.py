"""Prediction on face crops, images, folders and videos (fbnet_jax/serve/predict.py).

One tiny run is trained per module. The faces are the generator's own (data_pipelines/
synthetic_render.py) with every nuisance off: OpenCV's Haar cascade finds them, so detection is
tested on scenes with faces pasted at known places.
"""

import csv
import json
import logging

import cv2
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageOps

from data_pipelines import synthetic_render
from data_pipelines.sources import base
from fbnet_jax.serve import media, predict
from fbnet_jax.core import taxonomy
from fbnet_jax.core.errors import UserError
from conftest import train_tiny_run

FACE = 128   # side of a pasted face render
# Where the faces of the scene are pasted (top-left corners), left to right.
PLACES = ((20, 30), (190, 100), (360, 40))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("run"), 2)


@pytest.fixture(scope="module")
def predictor(workdir):
    # 4 per batch, so that a few faces already make several batches.
    return predict.Predictor.from_workdir(workdir, batch_size=4)


def _face(seed: int, size: int = FACE) -> np.ndarray:
    """A frontal face render with no nuisance but the person's looks."""
    style = synthetic_render.Style(identity=0.5, pose=0, clutter=0, lighting=0, blur=0, noise=0,
                                   jpeg=0, occlusion=0)
    look = synthetic_render.draw_look(np.random.default_rng(seed), style, size)
    return synthetic_render.paint(look, {12: 1.0} if seed % 2 else {}, size)


def _scene(places=PLACES, shape=(300, 520)) -> np.ndarray:
    scene = np.full((*shape, 3), 128, np.uint8)
    for k, (x, y) in enumerate(places):
        scene[y:y + FACE, x:x + FACE] = _face(k)
    return scene


def _save(path, image: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def _values(row, columns):
    return [row[c] for c in columns]


def _prediction_columns(predictor):
    return [*taxonomy.EXPRESSIONS, *(f"AU{a}" for a in predictor.model.aus), "valence", "arousal"]


def _expected_row_values(out, k):
    """Row k of `Predictor.predict` outputs as the rounded row values, in column order."""
    values = [*out["expression_probs"][k], *out["au_probs"][k], out["valence"][k],
              out["arousal"][k]]
    return [round(float(v), predict.DECIMALS) for v in values]


def test_predict_is_the_network_on_pipeline_inputs_compiled_once(workdir):
    predictor = predict.Predictor.from_workdir(workdir, batch_size=4)
    model = predictor.model
    rng = np.random.default_rng(0)
    # Shrunk (INTER_AREA), kept, grown (INTER_LINEAR) and stretched, as ResizeImage does.
    images = [rng.integers(0, 256, shape, np.uint8)
              for shape in ((50, 50, 3), (32, 32, 3), (20, 20, 3), (40, 24, 3), (64, 64, 3))]
    resized = np.stack([
        cv2.resize(images[0], (32, 32), interpolation=cv2.INTER_AREA), images[1],
        cv2.resize(images[2], (32, 32), interpolation=cv2.INTER_LINEAR),
        cv2.resize(images[3], (32, 32), interpolation=cv2.INTER_LINEAR),
        cv2.resize(images[4], (32, 32), interpolation=cv2.INTER_AREA)])
    logits = jax.device_get(model.apply(model.preprocess(resized)))
    out = predictor.predict(images)
    assert set(out) == {"expression_probs", "expression", "au_probs", "valence", "arousal"}
    probs = np.exp(logits["expression_logits"])
    np.testing.assert_allclose(out["expression_probs"], probs / probs.sum(1, keepdims=True),
                               atol=1e-6)
    np.testing.assert_array_equal(out["expression"], logits["expression_logits"].argmax(1))
    np.testing.assert_allclose(out["au_probs"], 1 / (1 + np.exp(-logits["au_logits"])),
                               atol=1e-6)
    np.testing.assert_allclose(np.stack([out["valence"], out["arousal"]], 1), logits["va"],
                               atol=1e-6)
    assert out["au_probs"].shape == (5, len(taxonomy.AUS))
    # Padding the last batch changes nothing, and one shape was compiled for all calls.
    alone = predictor.predict(images[:1])
    np.testing.assert_allclose(alone["au_probs"], out["au_probs"][:1], atol=1e-6)
    assert predictor.predict(np.zeros((0, 9, 9, 3), np.uint8))["au_probs"].shape == (0, 17)
    assert predictor._apply._cache_size() == 1  # pylint: disable=protected-access
    with pytest.raises(ValueError, match=r"image 1: expected uint8 RGB"):
        predictor.predict([images[0], images[1].astype(np.float32)])


def test_every_face_of_an_image_at_its_place(predictor, tmp_path):
    scene = _scene()
    path = _save(tmp_path / "scene.png", scene)
    counts = predict.Counts()
    rows = list(predictor.predict_files([path], counts=counts))
    assert [r["face"] for r in rows] == [0, 1, 2]
    assert {r["status"] for r in rows} == {predict.OK}
    boxes = np.array([_values(r, ("x0", "y0", "x1", "y1")) for r in rows], float)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    np.testing.assert_allclose(centres, np.array(PLACES) + FACE / 2, atol=0.15 * FACE)
    sides = boxes[:, 2:] - boxes[:, :2]
    assert np.all((sides > 0.5 * FACE) & (sides <= FACE))
    # Each face is the crop of its box with the training margin, through `predict`.
    crops = [base.crop_face(scene, box, predictor.margin) for box in boxes]
    out = predictor.predict(crops)
    columns = _prediction_columns(predictor)
    for k, row in enumerate(rows):
        assert _values(row, columns) == pytest.approx(_expected_row_values(out, k), abs=2e-6)
        assert row["expression"] == taxonomy.EXPRESSIONS[out["expression"][k]]
        assert sum(row[e] for e in taxonomy.EXPRESSIONS) == pytest.approx(1, abs=1e-5)
    assert (counts.images, counts.frames, counts.faces, counts.no_face) == (1, 1, 3, 0)


def test_an_image_without_a_face_has_one_row_saying_so(predictor, tmp_path):
    ramp = np.broadcast_to(np.linspace(40, 200, 240, dtype=np.uint8)[None, :, None],
                           (180, 240, 3))
    path = _save(tmp_path / "wall.png", np.ascontiguousarray(ramp))
    counts = predict.Counts()
    [row] = predictor.predict_files([path], counts=counts)
    assert (row["file"], row["frame"], row["face"], row["status"]) == (
        str(path), 0, -1, predict.NO_FACE)
    assert all(row[c] is None for c in ("x0", "y0", "x1", "y1", "expression",
                                        *_prediction_columns(predictor)))
    assert (counts.frames, counts.faces, counts.no_face) == (1, 0, 1)
    assert "no face found in 1 frame " in counts.summary()
    # Rows come as their frames are read, not at the end of the input.
    counts = predict.Counts()
    rows = predictor.predict_files([path] * 3, counts=counts)
    assert next(rows)["face"] == -1 and counts.frames == 1
    with pytest.raises(UserError, match=r"missing\.png: no such file or folder"):
        predictor.predict_files([path, tmp_path / "missing.png"])   # before any row


def test_a_folder_skips_and_counts_what_it_cannot_read(predictor, tmp_path, caplog):
    folder = tmp_path / "photos"
    _save(folder / "a.png", _scene(PLACES[:1], (200, 200)))
    _save(folder / "sub" / "b.jpg", _scene(PLACES[:1], (200, 200)))
    jpeg = (folder / "sub" / "b.jpg").read_bytes()
    (folder / "corrupt.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    _save(folder / ".hidden" / "c.png", _scene(PLACES[:1], (200, 200)))   # left out
    counts = predict.Counts()
    with caplog.at_level(logging.WARNING):
        rows = list(predictor.predict_files([folder], counts=counts))
    assert [(r["file"], r["face"]) for r in rows] == [
        (str(folder / "a.png"), 0), (str(folder / "sub" / "b.jpg"), 0)]
    assert [f for f, _ in counts.skipped] == [
        str(folder / n) for n in ("corrupt.jpg", "empty.png", "notes.txt")]
    for name, why in (("corrupt.jpg", "not a readable image"), ("empty.png", "empty file"),
                      ("notes.txt", "not an image or a video")):
        assert any(name in m and why in m and "skipped" in m for m in caplog.messages), name
    assert (counts.images, counts.faces) == (2, 2)
    assert "skipped 3 unreadable files" in counts.summary()


def _write_video(path, frames, fourcc="MJPG"):
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def test_video_frames_with_a_stride(predictor, tmp_path, caplog):
    frames = [_scene([(16 + 2 * t, 16)], (160, 180)) for t in range(7)]
    video = tmp_path / "clip.avi"
    _write_video(video, frames)
    (tmp_path / "broken.mp4").write_bytes(b"not a video" * 10)
    counts = predict.Counts()
    with caplog.at_level(logging.WARNING):
        rows = list(predictor.predict_files([video, tmp_path / "broken.mp4"], stride=3,
                                            counts=counts))
    assert [(r["frame"], r["face"]) for r in rows] == [(0, 0), (3, 0), (6, 0)]
    assert rows[2]["x0"] - rows[0]["x0"] == pytest.approx(12, abs=4)   # the face moved 12 px
    assert (counts.videos, counts.frames, counts.faces) == (1, 3, 3)
    assert counts.skipped == [(str(tmp_path / "broken.mp4"),
                               f"{tmp_path / 'broken.mp4'}: OpenCV cannot open it as a video")]
    assert any("broken.mp4" in m for m in caplog.messages)
    # Frames come out RGB, every one with stride 1.
    colour = np.array([200, 30, 60], np.uint8)
    _write_video(tmp_path / "red.avi", [np.full((32, 48, 3), colour, np.uint8)] * 5)
    read = list(media.read_video(tmp_path / "red.avi"))
    assert [index for index, _ in read] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(read[0][1].mean(axis=(0, 1)), colour, atol=8)


def test_no_detect_predicts_whole_images_as_crops(predictor, tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, shape, np.uint8)
              for shape in ((32, 32, 3), (50, 40, 3), (20, 20, 3), (32, 32, 3), (70, 90, 3))]
    paths = [_save(tmp_path / f"crop{k}.png", image) for k, image in enumerate(images)]
    rows = list(predictor.predict_files(paths, detect=False))
    out = predictor.predict(images)
    assert [r["file"] for r in rows] == list(map(str, paths))
    columns = _prediction_columns(predictor)
    for k, (row, image) in enumerate(zip(rows, images)):
        assert (row["face"], row["status"]) == (0, predict.OK)
        assert _values(row, ("x0", "y0", "x1", "y1")) == [0, 0, image.shape[1], image.shape[0]]
        assert _values(row, columns) == _expected_row_values(out, k)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pil_does(tmp_path, orientation):
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 2
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    Image.fromarray(image).save(path, exif=exif)
    with Image.open(path) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    np.testing.assert_array_equal(media.read_image(path), expected)


def test_run_command_writes_csv_and_jsonl(workdir, predictor, tmp_path, caplog):
    folder = tmp_path / "in"
    _save(folder / "scene.png", _scene())
    _save(folder / "wall.png", np.full((120, 120, 3), 90, np.uint8))
    columns = ["file", "frame", "face", "x0", "y0", "x1", "y1", "Neutral", "Anger", "Disgust",
               "Fear", "Happiness", "Sadness", "Surprise", "expression",
               *(f"AU{a}" for a in taxonomy.AUS), "valence", "arousal", "status"]
    assert predictor.columns == columns
    with caplog.at_level(logging.INFO):
        assert predict.run_command(workdir, None, [folder], tmp_path / "p.csv") == 0
        assert predict.run_command(workdir, 2, [folder], tmp_path / "out" / "p.jsonl") == 0
    with open(tmp_path / "p.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == columns
        table = list(reader)
    lines = [json.loads(line) for line in (tmp_path / "out" / "p.jsonl").read_text().splitlines()]
    assert [list(line) for line in lines] == [columns] * 4
    assert [(r["face"], r["status"]) for r in lines] == [
        (0, "ok"), (1, "ok"), (2, "ok"), (-1, "no face found")]
    for row, line in zip(table, lines):
        for column in columns:
            value = line[column]
            if value is None:
                assert row[column] == ""
            elif isinstance(value, (int, float)):
                assert float(row[column]) == value
            else:
                assert row[column] == value
    summary = "predicted 2 files (2 images, 0 videos; 2 frames): 3 faces; no face found in 1 frame "
    assert any(summary in m for m in caplog.messages)
    # Nothing readable: no row, status 1.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    assert predict.run_command(workdir, None, [tmp_path / "bad"], tmp_path / "n.csv") == 1
    assert (tmp_path / "n.csv").read_text().splitlines() == [",".join(columns)]


def test_run_command_refuses_mistakes_before_loading(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    _save(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    for kwargs, message in (
            (dict(out=tmp_path / "p.txt"), r"--out .*p\.txt: write predictions to a \.csv or a "
                                           r"\.jsonl file"),
            (dict(inputs=[tmp_path / "nope.jpg"]), r"nope\.jpg: no such file or folder"),
            (dict(inputs=[tmp_path / "notes.txt"]), r"no image or video among"),
            (dict(inputs=[]), r"give the images"),
            (dict(stride=0), r"--stride 0: must be >= 1"),
            (dict(batch_size=0), r"--batch_size 0: must be >= 1"),
            (dict(), r"no such directory")):
        args = dict(workdir=tmp_path / "no_run", step=None, inputs=[tmp_path / "a.png"],
                    out=tmp_path / "p.csv")
        with pytest.raises(UserError, match=message):
            predict.run_command(**{**args, **kwargs})


def test_training_margin_of_a_config(tiny_config):
    assert predict.training_margin(tiny_config) == 0.2   # synthetic sources crop nothing
    sources = tiny_config.data.sources
    with tiny_config.unlocked():
        sources.real = ml_collections.ConfigDict(dict(kind="rafdb", weight=0.3, margin=0.1))
        assert predict.training_margin(tiny_config) == 0.1
        # Sources that differ: the most weighted one's.
        sources.other = ml_collections.ConfigDict(dict(kind="affectnet", weight=0.9, margin=0.35))
        assert predict.training_margin(tiny_config) == 0.35
