"""The synthetic faces: determinism, label publishing and statistics, local AU effects, styles."""

import hashlib
import pickle
import subprocess
import sys

import cv2
import grain
import numpy as np
import pytest
from conftest import REPO, run_isolated

from data_pipelines import schema, synthetic, synthetic_render
from fbnet_jax.core import taxonomy

AUS = taxonomy.AUS
CLEAN = synthetic.Style(identity=0, pose=0, clutter=0, lighting=0, blur=0, noise=0, jpeg=0,
                        occlusion=0)


def _source(split="train", **spec):
    spec = {"num_records": 50, "image_size": 32, **spec}
    return synthetic.SyntheticFaces(synthetic.SyntheticSpec(**spec), split=split)


def _assert_same_record(a, b):
    assert a.keys() == b.keys()
    for field in a:
        np.testing.assert_array_equal(a[field], b[field], err_msg=field)


def _digest(record):
    return hashlib.md5(record["image"].tobytes()).hexdigest()


def test_records_are_deterministic():
    source = _source()
    first = source[7]
    _assert_same_record(first, source[7])
    _assert_same_record(first, _source()[7])
    assert _digest(first) != _digest(source[8])
    assert _digest(first) != _digest(_source(split="validation")[7])
    assert _digest(first) != _digest(_source(seed=1)[7])


def test_records_are_the_same_in_another_process():
    code = ("from data_pipelines import synthetic as s; import hashlib\n"
            "src = s.SyntheticFaces(s.SyntheticSpec(num_records=50, image_size=32), split='test')\n"
            "r = src[11]; print(hashlib.md5(r['image'].tobytes()).hexdigest(), r['va'].tolist())")
    record = _source(split="test")[11]
    assert run_isolated(code).split(maxsplit=1) == [_digest(record), f"{record['va'].tolist()}\n"]


@pytest.mark.parametrize("spec", [
    {}, {"compound": True}, {"video_frames": 5}, {"image_size": 24, "style": CLEAN},
    {"label_expression": False, "label_va": False, "label_aus": ()},
])
def test_records_follow_the_schema(spec):
    source = _source(**spec)
    for index in (0, 1, 17, 49):
        record = source[index]
        schema.validate_record(record)
        size = source.spec.image_size
        assert record["image"].shape == (size, size, 3) and record["image"].dtype == np.uint8
        assert record["key"] == f"synthetic/train/{index:07d}"
    assert len(source) == 50


def test_key_source_and_length_overrides():
    source = synthetic.SyntheticFaces(synthetic.SyntheticSpec(num_records=50), split="test",
                                      num_records=9, source_index=3, name="faces")
    assert len(source) == 9
    assert source[8]["key"] == "faces/test/0000008" and source[8]["source"] == 3
    with pytest.raises(IndexError):
        source[9]


def test_train_split_publishes_only_what_the_spec_says():
    source = _source(label_expression=False, label_va=False, label_aus=[1, 12, 11])
    published = np.isin(AUS, (1, 12))
    for index in range(10):
        record = source[index]
        assert record["expression"] == -1 and record["compound"] == -1
        assert np.isnan(record["va"]).all()
        assert (record["au"][~published] == -1).all()
        assert np.isin(record["au"][published], (0, 1)).all()
    none = _source(label_aus=())
    assert (none[0]["au"] == -1).all() and 0 <= none[0]["expression"] < 7
    assert not np.isnan(none[0]["va"]).any()


@pytest.mark.parametrize("split", ["test", "validation"])
def test_evaluation_splits_are_fully_labelled(split):
    source = _source(split, label_expression=False, label_va=False, label_aus=())
    for index in range(10):
        record = source[index]
        assert 0 <= record["expression"] < 7 and record["compound"] == -1
        assert not np.isnan(record["va"]).any() and np.isin(record["au"], (0, 1)).all()


@pytest.mark.parametrize("split", ["train", "test"])
def test_compound_spec(split):
    source = _source(split, compound=True)
    classes = set()
    for index in range(40):
        record = source[index]
        assert record["expression"] == -1 and 0 <= record["compound"] < 11
        assert np.isin(record["au"], (0, 1)).all()
        classes.add(int(record["compound"]))
    assert len(classes) >= 8


def test_a_shorter_au_list():
    aus = (12, 25, 4)
    source = synthetic.SyntheticFaces(synthetic.SyntheticSpec(num_records=5, image_size=32),
                                      aus=aus)
    schema.validate_record(source[0], num_aus=3)
    with pytest.raises(ValueError, match="unknown AU"):
        synthetic.SyntheticFaces(synthetic.SyntheticSpec(num_records=5), aus=(12, 99))


def _draw(n, compound=False):
    rng = np.random.default_rng(0)
    return [synthetic.draw_labels(rng, compound=compound) for _ in range(n)]


def test_label_statistics_follow_the_relatedness_table():
    labels = _draw(2100)
    expression = np.array([x.expression for x in labels])
    active = np.array([x.au_active for x in labels]).astype(float)
    intensity = np.array([x.au_intensity for x in labels])
    va = np.array([x.va for x in labels])
    assert np.bincount(expression, minlength=7).min() > 240          # uniform: 300 each
    prototypical = taxonomy.prototypical_mask(taxonomy.EXPRESSIONS)
    weights = taxonomy.basic_relatedness()
    free = ~(weights > 0).any(axis=0)                                   # AU14
    rates = np.array([active[expression == k].mean(0) for k in range(7)])
    assert (rates[prototypical] > 0.85).all()
    observational = (weights > 0) & ~prototypical
    np.testing.assert_allclose(rates[observational], weights[observational], atol=0.1)
    unrelated = (weights == 0) & ~free
    assert rates[unrelated].mean() < 0.08 and (rates[unrelated] < 0.15).all()
    assert (rates[0, ~free] < 0.12).all()                               # Neutral: base rate only
    np.testing.assert_allclose(rates[:, free], synthetic.FREE_AU_RATE, atol=0.07)
    # Active AUs are clearly on; inactive ones exactly 0.
    assert (intensity[active == 1] >= synthetic.MIN_INTENSITY).all()
    assert (intensity[active == 1] <= 1).all() and (intensity[active == 0] == 0).all()
    # Valence/arousal sit around each expression's place on the circumplex.
    assert (np.abs(va) <= 1).all()
    mean_va = np.array([va[expression == k].mean(0) for k in range(7)])
    happy, sad, neutral = (taxonomy.EXPRESSIONS.index(n) for n in
                           ("Happiness", "Sadness", "Neutral"))
    assert mean_va[happy, 0] > 0.4 and mean_va[sad, 0] < -0.3 and mean_va[sad, 1] < -0.15
    assert np.abs(mean_va[neutral]).max() < 0.05
    assert 0.05 < va[expression == neutral].std(0).mean() < 0.12


def test_compound_labels_use_the_compound_table():
    labels = _draw(2200, compound=True)
    compound = np.array([x.compound for x in labels])
    active = np.array([x.au_active for x in labels]).astype(float)
    assert all(x.expression == -1 for x in labels)
    assert np.bincount(compound, minlength=11).min() > 150              # uniform: 200 each
    prototypical = taxonomy.prototypical_mask(taxonomy.RAF_COMPOUND_CLASSES,
                                              rows=taxonomy.COMPOUND_RELATEDNESS)
    rates = np.array([active[compound == k].mean(0) for k in range(11)])
    assert (rates[prototypical] > 0.8).all()
    # A compound's VA is the mean of its two components' places on the circumplex.
    va = np.array([x.va for x in labels])
    happily_surprised = taxonomy.RAF_COMPOUND_CLASSES.index("Happily Surprised")
    assert va[compound == happily_surprised, 0].mean() > 0.2
    assert va[compound == happily_surprised, 1].mean() > 0.3


def _pixel_box(au, size):
    u0, v0, u1, v1 = synthetic_render.AU_REGIONS[au]
    unit = synthetic_render.FACE_UNIT * size
    x0, x1 = (size * synthetic_render.CENTRE_X + u * unit for u in (u0, u1))
    y0, y1 = (size * synthetic_render.CENTRE_Y + v * unit for v in (v0, v1))
    # One pixel of slack for anti-aliasing and downsampling.
    return slice(max(int(y0) - 1, 0), int(y1) + 2), slice(max(int(x0) - 1, 0), int(x1) + 2)


@pytest.mark.parametrize("au", synthetic_render.RENDERABLE_AUS)
def test_each_au_changes_its_own_region_and_grows_with_intensity(au):
    size = 64
    look = synthetic_render.draw_look(np.random.default_rng(0), CLEAN, size)
    neutral = synthetic_render.paint(look, {}, size).astype(int)
    change = [np.abs(synthetic_render.paint(look, {au: a}, size) - neutral).sum(-1)
              for a in (0.4, 1.0)]
    rows, cols = _pixel_box(au, size)
    for diff in change:
        assert (diff > 30).sum() >= 10, "too faint"
        assert diff[rows, cols].sum() >= 0.99 * diff.sum(), "not local"
    assert change[1].sum() > 1.1 * change[0].sum()


def test_same_rng_same_person_for_any_aus():
    spec = synthetic.SyntheticSpec(num_records=1)
    zeros = np.zeros(len(AUS), np.float32)
    smile = zeros.copy()
    smile[AUS.index(12)] = 0.8
    neutral = synthetic.render_face(np.random.default_rng(5), zeros, spec)
    again = synthetic.render_face(np.random.default_rng(5), zeros, spec)
    smiling = synthetic.render_face(np.random.default_rng(5), smile, spec)
    np.testing.assert_array_equal(neutral, again)
    diff = np.abs(smiling.astype(int) - neutral).sum(-1)
    # Default style: JPEG and blur may spread the change a little, but it stays in the
    # lower part of the face.
    assert diff.sum() > 0 and diff[:24].sum() < 0.05 * diff.sum()


def test_zero_style_gives_a_clean_image():
    spec = synthetic.SyntheticSpec(num_records=1, style=CLEAN)
    zeros = np.zeros(len(AUS))
    images = [synthetic.render_face(np.random.default_rng(seed), zeros, spec) for seed in (1, 2)]
    # No identity, pose, clutter, lighting or occluder: the same face for every rng...
    np.testing.assert_array_equal(*images)
    # ...on a flat grey background with no noise, blur or JPEG.
    corner = images[0][:8, :8].reshape(-1, 3)
    assert (corner == 128).all()
    # The default style varies the background (clutter, lighting, noise) from image to image.
    source = _source()
    corners = [np.unique(source[i]["image"][:8, :8].reshape(-1, 3), axis=0) for i in range(8)]
    assert max(len(c) for c in corners) > 1
    assert len({c[0].tobytes() for c in corners}) == 8


def test_style_rejects_negative_levels_and_takes_lists():
    with pytest.raises(ValueError):
        synthetic.Style(noise=-1)
    assert synthetic.Style(tint=[1, 0.9, 0.8]).tint == (1.0, 0.9, 0.8)
    assert synthetic.SyntheticSpec(num_records=1, label_aus=[1, 2]).label_aus == (1, 2)


def test_tint_changes_the_colours():
    plain, tinted = (synthetic.SyntheticFaces(synthetic.SyntheticSpec(
        num_records=1, image_size=32, style=synthetic.Style(tint=tint)))[0]["image"]
        for tint in ((1, 1, 1), (1.0, 0.8, 0.6)))
    assert plain[..., 2].mean() > tinted[..., 2].mean() + 10


def test_video_clips():
    frames = 6
    source = _source(video_frames=frames, num_records=18)
    records = [source[i] for i in range(18)]
    for clip in range(3):
        run = records[clip * frames:(clip + 1) * frames]
        assert len({int(r["expression"]) for r in run}) == 1
        assert len({r["au"].tobytes() for r in run}) == 1
        assert len({_digest(r) for r in run}) == frames   # but every frame differs

    def step(a, b):
        return np.abs(a["image"].astype(int) - b["image"]).mean()

    within = np.mean([step(records[i], records[i + 1]) for i in range(frames - 1)])
    across = np.mean([step(records[i], records[i + frames]) for i in range(frames)])
    assert within < 0.5 * across
    assert np.abs(records[0]["va"] - records[1]["va"]).max() < 0.1


def test_source_is_picklable_and_works_in_grain():
    source = _source()
    clone = pickle.loads(pickle.dumps(source))
    _assert_same_record(source[3], clone[3])
    assert repr(clone) == repr(source)
    assert isinstance(source, grain.sources.RandomAccessDataSource)
    dataset = grain.MapDataset.source(source).batch(4)
    np.testing.assert_array_equal(dataset[1]["image"][0], source[4]["image"])


def test_a_cached_source_renders_each_record_once_and_serves_the_same_records(monkeypatch):
    plain = _source(video_frames=5)
    cached = synthetic.SyntheticFaces(plain.spec, split="train", cache=True)
    painted = []
    paint = synthetic.paint
    monkeypatch.setattr(synthetic, "paint", lambda *a, **k: painted.append(1) or paint(*a, **k))
    for index in (3, 7, 3, 3, 7, 11):
        _assert_same_record(cached[index], plain[index])
    assert len(painted) == 3 + 6   # the cached source painted 3, 7 and 11 once; plain 6 times
    record = cached[3]
    assert not record["image"].flags.writeable    # a transform cannot change the cache
    with pytest.raises(ValueError, match="read-only"):
        record["image"][0, 0, 0] = 1
    record["image"] = None   # the dict is a copy: the cache still holds the image
    assert cached[3]["image"] is not None
    clone = pickle.loads(pickle.dumps(cached))
    assert clone._cached == {} and len(cached._cached) == 3 and clone.cache
    assert repr(clone) == repr(cached) == repr(plain)   # grain checkpoints: the same source


def test_contact_sheet(tmp_path):
    source = _source(compound=True)
    path = tmp_path / "sheet.png"
    sheet = synthetic.contact_sheet(source, range(10), path, columns=4)
    written = cv2.imread(str(path))
    assert written.shape == sheet.shape
    tile_height, tile_width = 2 * 32 + 11 * 6 + 4 + 4, 112 + 4
    assert sheet.shape == (3 * tile_height, 4 * tile_width, 3)


def test_contact_sheet_command(tmp_path):
    path = tmp_path / "sheet.png"
    synthetic.main(["--out", str(path), "--n", "3", "--size", "32", "--seed", "1"])
    assert cv2.imread(str(path)).shape[0] > 64


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n must be at least 1, got 0"),
    (["--n", "-4"], "--n must be at least 1, got -4"),
    (["--size", "0"], "--size must lie in 8..1024, got 0"),
    (["--size", "7"], "--size must lie in 8..1024, got 7"),
    (["--video-frames", "-1"], "--video-frames must be 0 or more, got -1"),
])
def test_contact_sheet_command_rejects_bad_numbers(tmp_path, args, message):
    path = tmp_path / "sheet.png"
    result = subprocess.run([sys.executable, "-m", "data_pipelines.synthetic", "--out", str(path),
                             *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    # argparse's usage lines, then one error line.
    assert result.stderr.strip().splitlines()[-1] == (
        f"python -m data_pipelines.synthetic: error: {message}")
    assert not path.exists()


def test_the_swapped_table_exchanges_the_documented_au_columns():
    du = synthetic.au_probabilities(False, taxonomy.AUS)
    swapped = synthetic.au_probabilities(False, taxonomy.AUS, "swapped")
    column = {au: i for i, au in enumerate(taxonomy.AUS)}
    expected = du.copy()
    for a, b in synthetic.SWAPPED_AU_PAIRS:
        expected[:, [column[a], column[b]]] = du[:, [column[b], column[a]]]
    np.testing.assert_array_equal(swapped, expected)
    happiness = taxonomy.EXPRESSIONS.index("Happiness")
    assert swapped[happiness, column[14]] == synthetic.PROTOTYPICAL_RATE
    # AU12 is now moved by no expression (AU14 was not), so every class shows it at the free rate.
    assert (swapped[:, column[12]] == synthetic.FREE_AU_RATE).all()
    # Faces of a swapped source follow it: Happiness moves AU14, not AU12.
    spec = synthetic.SyntheticSpec(num_records=600, seed=3, image_size=16, au_table="swapped")
    faces = synthetic.SyntheticFaces(spec, split="train", aus=taxonomy.AUS)
    rows = [faces[i] for i in range(600)]
    happy = np.array([r["au"] for r in rows if r["expression"] == happiness])
    assert len(happy) > 50
    assert happy[:, column[14]].mean() > 0.8 and happy[:, column[12]].mean() < 0.35


def test_an_unknown_au_table_is_refused():
    with pytest.raises(ValueError, match="invalid SyntheticSpec"):
        synthetic.SyntheticSpec(num_records=1, au_table="nope")
