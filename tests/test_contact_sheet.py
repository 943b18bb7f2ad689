"""The contact sheet of what the model is fed: the command, captions as masked, images shown."""

import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import REPO, load_config

from data_pipelines import contact_sheet, device_augment, pipeline, schema
from fbnet_jax.core import images, taxonomy

TINY = "configs/synthetic.py:tiny"
# Tiny config: 32 px images, shown 4x (128 px) in 160 px wide tiles with 6 lines of 11 px text,
# each tile framed by 2 px.
SIDE, TILE_WIDTH, TILE_HEIGHT = 128, 160 + 4, 128 + 6 * 11 + 4 + 4


def _run(*args):
    return subprocess.run([sys.executable, "-m", "data_pipelines.contact_sheet", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def _tile_image(sheet, index, columns):
    """The image part of tile `index` of a sheet drawn with `columns` columns."""
    row, column = divmod(index, columns)
    top = row * TILE_HEIGHT + 2
    left = column * TILE_WIDTH + 2 + (TILE_WIDTH - 4 - SIDE) // 2
    return sheet[top:top + SIDE, left:left + SIDE]


def test_command_writes_a_grid(tmp_path):
    path = tmp_path / "fed.png"
    result = _run("--config", TINY, "--out", str(path), "--n", "6")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    # Six tiles in one row.
    assert cv2.imread(str(path)).shape == (TILE_HEIGHT, 6 * TILE_WIDTH, 3)


@pytest.mark.parametrize("config, message", [
    ("configs/missing.py", "--config configs/missing.py: no such file, and not a config "
                           "shipped with fbnet_jax (those are: ablation.py, paper_vgg.py, "
                           "synthetic.py)"),
    ("configs/synthetic.py:huge", "--config configs/synthetic.py:huge: ValueError: unknown "
                                  "variant 'huge' of configs/synthetic.py; use '' or 'tiny'"),
])
def test_a_bad_config_is_one_line(tmp_path, config, message):
    result = _run("--config", config, "--out", str(tmp_path / "fed.png"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"python -m data_pipelines.contact_sheet: error: {message}")


def _batch(**rows):
    """A hand-made batch of masked labels; `rows` maps field -> per-row values."""
    return {field: np.asarray(values) for field, values in rows.items()}


def test_tile_caption_shows_labels_as_masked():
    aus = taxonomy.AUS
    labelled = np.isin(aus, (1, 2, 4, 12)).astype(np.float32)
    # Row 0: expression masked (its value must not show), AUs 1 2 4 12 labelled of which 1 and
    # 12 active, AU 25 carrying a 1 although unlabelled, VA masked.
    # Row 1: everything labelled, no AU active. Row 2: only a compound class.
    au = np.zeros((3, len(aus)), np.float32)
    au[0, [aus.index(1), aus.index(12), aus.index(25)]] = 1
    batch = _batch(
        source=[1, 0, 2], expression=[4, 4, 0], expression_mask=[0, 1, 0],
        compound=[0, 0, taxonomy.RAF_COMPOUND_CLASSES.index("Happily Surprised")],
        compound_mask=[0, 0, 1], au=au, au_mask=[labelled, np.ones(len(aus)), np.zeros(len(aus))],
        va=[[0.3, 0.3], [0.42, -0.1], [0, 0]], va_mask=[0, 1, 0])
    names = ["affectnet_like", "rafdb_like", "bp4d_like"]
    captions = [contact_sheet.tile_caption(batch, row, names, aus) for row in range(3)]
    assert captions == [
        ["rafdb_like", "expr \u2013", "AU 1 12 (4 lab.)", "VA \u2013"],
        ["affectnet_like", "Happiness", "AU none (17 lab.)", "V +0.42 A -0.10"],
        ["bp4d_like", "Happily Surprised", "AU \u2013", "VA \u2013"],
    ]


def test_to_display_inverts_normalize():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=-1)
    normalised = images.to_model_input(values)
    np.testing.assert_array_equal(contact_sheet.to_display(normalised), values)


def test_train_tiles_show_the_batches_training_consumes(tmp_path):
    config = load_config("synthetic.py", "tiny")
    batch = contact_sheet.first_examples(config, "train", 6)
    # The first rows of the train iterator's first batch, augmented as the train step augments
    # step 0's batch.
    iterator = pipeline.build_train_iterator(config, process_index=0, process_count=1)
    try:
        first = next(iterator)
    finally:
        pipeline.close_iterator(iterator)
    stored = first["image"]
    augment = device_augment.DeviceAugment.from_config(config.data.augment)
    first["image"] = np.asarray(augment.augment(
        stored, device_augment.example_keys(config.seed, 0, first["row"])))
    assert not np.array_equal(first["image"][:6], images.to_model_input(stored[:6]))
    for field, value in batch.items():
        np.testing.assert_array_equal(value, first[field][:6], err_msg=field)
    sheet = contact_sheet.draw(batch, pipeline.source_names(config.data), config.data.aus,
                               str(tmp_path / "fed.png"))
    assert sheet.shape == (TILE_HEIGHT, 6 * TILE_WIDTH, 3)
    for row in range(6):
        shown = np.rint(batch[schema.IMAGE][row] * 128 + 128).astype(np.uint8)
        np.testing.assert_array_equal(_tile_image(sheet, row, 6),
                                      shown.repeat(4, axis=0).repeat(4, axis=1))


def test_evaluation_split_skips_padding_and_seed_overrides(tmp_path):
    config = load_config("synthetic.py", "tiny")
    # 3 sources x 24 test examples = 72, in batches of 32: the last batch has 24 padding rows.
    batch = contact_sheet.first_examples(config, "test", 100)
    assert len(batch[schema.SOURCE]) == 72 and all(batch[schema.KEY])
    assert (batch["expression_mask"] == 1).all()
    # --seed replaces config.seed: another train order than the config's seed 0.
    path = tmp_path / "fed.png"
    contact_sheet.main(["--config", str(REPO / TINY), "--out", str(path), "--n", "3",
                        "--seed", "5"])
    config.seed = 5
    reseeded = contact_sheet.first_examples(config, "train", 3)
    config.seed = 0
    assert list(reseeded[schema.KEY]) != list(contact_sheet.first_examples(config, "train",
                                                                           3)[schema.KEY])
    written = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    for row in range(3):
        shown = contact_sheet.to_display(reseeded[schema.IMAGE][row])
        np.testing.assert_array_equal(_tile_image(written, row, 3),
                                      shown.repeat(4, axis=0).repeat(4, axis=1))
