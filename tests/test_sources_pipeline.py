"""Dataset sources in the mixture: config entries, validation, evaluation and a short run."""

import contextlib
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from data_pipelines import pipeline
from data_pipelines.tfds_builders import prepare
from fbnet_jax.train import checks as config_checks
from fbnet_jax.train import loop as train
from fbnet_jax.core.errors import ConfigError


def _dataset(folder, rows, corrupt=()):
    """A manifest dataset: rows of (subject, expression or "", AU12 or "", split)."""
    rng = np.random.default_rng(len(rows))
    lines = ["path,expression,AU12,valence,arousal,subject,split"]
    for k, (subject, expression, au12, split) in enumerate(rows):
        path = folder / "img" / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)
        if k in corrupt:
            path.write_bytes(b"\x89PNG broken")
        va = ("0.25", "-0.5") if expression == "" else ("", "")
        lines.append(",".join([f"img/{k}.png", expression, au12, *va, subject, split]))
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder


def _config(tiny_config, roots):
    config = tiny_config
    sources = {name: pipeline.dataset_source("manifest", str(root), weight=1.0)
               for name, root in roots.items()}
    with config.unlocked():
        config.data.sources = type(config.data.sources)(sources)
    config.train.num_steps = 3
    config.evals.validation.every = 0
    config.train.log_every = 1
    config.train.best_metric = ""
    return config


def _rows(n, split_of, expression):
    return [(f"S{k}", (str(k % 7) if expression else ""), ("" if expression else str(k % 2)),
             split_of(k)) for k in range(n)]


def _two_datasets(tmp_path, corrupt=()):
    split_of = lambda k: ("train", "validation", "test")[k % 3]  # noqa: E731
    return {"faces_expr": _dataset(tmp_path / "expr", _rows(12, split_of, True), corrupt),
            "faces_au": _dataset(tmp_path / "au", _rows(9, split_of, False))}


def test_dataset_source_entries_hold_every_option(tmp_path):
    entry = pipeline.dataset_source("manifest", str(tmp_path), weight=2.0, seed=4)
    assert entry.to_dict() == {"kind": "manifest", "root": str(tmp_path), "weight": 2.0,
                               "margin": 0.2, "strict": False, "balance_expressions": False,
                               "prepared": "", "prepared_image_size": 0,
                               "options": {
                                   "validation_fraction": 0.1, "test_fraction": 0.1, "seed": 4}}
    with pytest.raises(ValueError, match=r"manifest: unknown option\(s\) sede"):
        pipeline.dataset_source("manifest", str(tmp_path), sede=4)


def test_config_problems_name_the_field(tiny_config, tmp_path):
    config = _config(tiny_config, {"a": "", "b": tmp_path / "nowhere"})
    config.data.sources.a.options.seed = 1
    config.data.sources.b.margin = -1.0
    with pytest.raises(ConfigError) as error:
        config_checks.validate(config, num_devices=1, num_processes=1)
    text = str(error.value)
    assert ("data.sources.a.root: empty; give the manifest dataset's folder with "
            "--config.data.sources.a.root=/path/to/it") in text
    assert f"data.sources.b.root: {tmp_path / 'nowhere'} does not exist" in text
    assert "data.sources.b.margin: must be >= 0, got -1.0" in text


def test_eval_scores_every_readable_image_once_and_skips_unreadable_ones(tiny_config, tmp_path):
    config = _config(tiny_config, _two_datasets(tmp_path, corrupt=(2,)))
    batches = pipeline.build_eval_batches(config, split="test", process_index=0,
                                          process_count=1)
    keys, sources = [], []
    for batch in batches:
        valid = batch["valid"] > 0
        keys += list(batch["key"][valid])
        sources += list(batch["source"][valid])
    # Test rows are k = 2, 5, 8, 11 of faces_expr (2 is corrupt) and 2, 5, 8 of faces_au;
    # sources are in name order: faces_au = 0, faces_expr = 1.
    assert keys == ["img/2.png", "img/5.png", "img/8.png", "img/5.png", "img/8.png",
                    "img/11.png"]
    assert sources == [0, 0, 0, 1, 1, 1]


def _rafdb(folder):
    """A RAF-DB basic set: 10 train and 3 test aligned faces, the label file without a final
    newline, as published."""
    rng = np.random.default_rng(7)
    names = [f"train_{k:05d}.jpg" for k in range(1, 11)] + [f"test_{k:04d}.jpg" for k in (1, 2, 3)]
    for name in names:
        path = folder / "basic" / "Image" / "aligned" / name.replace(".jpg", "_aligned.jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
    labels = folder / "basic" / "EmoLabel" / "list_patition_label.txt"
    labels.parent.mkdir(parents=True)
    labels.write_text("\n".join(f"{name} {k % 7 + 1}" for k, name in enumerate(names)))
    return folder / "basic"


def test_a_short_run_on_a_mixture_of_two_datasets(tiny_config, tmp_path):
    roots = _two_datasets(tmp_path)
    config = _config(tiny_config, {"faces_expr": roots["faces_expr"]})
    with config.unlocked():
        config.data.sources.rafdb = pipeline.dataset_source(
            "rafdb", str(_rafdb(tmp_path / "raf")), validation_fraction=0.5)
    results = train.train_and_evaluate(config, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["step"] == 3 == results["step"]
    for source in ("faces_expr", "rafdb"):  # per-source test metrics of both datasets
        assert np.isfinite(saved[f"test/{source}/expression_accuracy"]), saved.keys()
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"source faces_expr: manifest [train] 4 record(s) from {tmp_path}/expr; no record " \
           "skipped" in log
    assert "source rafdb: rafdb [test] 3 record(s) from" in log
    # Train rows of faces_expr are k = 0, 3, 6, 9, with expressions k % 7 = 0, 3, 6, 2.
    assert ("source faces_expr: training images per expression: Neutral 1, Anger 0, Disgust 1, "
            "Fear 1, Happiness 0, Sadness 0, Surprise 1, no expression 0") in log


def test_balanced_sampling_makes_expressions_equally_frequent(tiny_config, tmp_path):
    # 30 Happiness, 3 Disgust, 10 without an expression (VA only), all in the train split.
    rows = ([(f"S{k}", "4", "", "train") for k in range(30)]
            + [(f"D{k}", "2", "", "train") for k in range(3)]
            + [(f"V{k}", "", "", "train") for k in range(10)])
    folder = _dataset(tmp_path / "skewed", rows)
    counts = {}
    for balance in (False, True):
        config = _config(tiny_config, {"skewed": folder})
        config.data.sources.skewed.balance_expressions = balance
        config.data.augment.max_shift = 0.0
        with contextlib.closing(pipeline.build_train_iterator(
                config, process_index=0, process_count=1)) as it:
            batches = [next(it) for _ in range(150)]
        expression = np.concatenate([b["expression"] for b in batches])
        mask = np.concatenate([b["expression_mask"] for b in batches]) > 0
        counts[balance] = (np.sum(mask & (expression == 4)), np.sum(mask & (expression == 2)),
                           np.sum(~mask))
    total = 150 * 16
    happy, disgust, unlabelled = counts[False]
    assert abs(disgust / total - 3 / 43) < 0.02 and abs(happy / total - 30 / 43) < 0.03
    happy, disgust, unlabelled = counts[True]
    assert abs(happy / total - 33 / 86) < 0.03 and abs(disgust / total - 33 / 86) < 0.03
    assert abs(unlabelled / total - 10 / 43) < 0.03


def test_a_config_source_reads_the_prepared_copy_the_command_wrote(tiny_config, tmp_path):
    roots = _two_datasets(tmp_path, corrupt=(2,))
    data_dir = tmp_path / "prepared"
    printed = {}
    for name, root in roots.items():
        result = subprocess.run(
            [sys.executable, "-m", "fbnet_jax", "prepare", "--dataset", "manifest",
             "--manual_dir", str(root), "--data_dir", str(data_dir / name)],
            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
            text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        printed[name] = result.stdout.splitlines()[-3:]
    # One data_dir holds one preparation per dataset and options: another copy is refused.
    again = subprocess.run(
        [sys.executable, "-m", "fbnet_jax", "prepare", "--dataset", "manifest",
         "--manual_dir", str(roots["faces_au"]), "--data_dir", str(data_dir / "faces_expr")],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=300, check=False)
    assert again.returncode == 2 and "already holds manifest with these options, prepared " \
        f"from {roots['faces_expr']}, not {roots['faces_au']}" in again.stderr
    assert printed == {
        "faces_au": ["  train: 3 record(s) written, 0 skipped",
                     "  validation: 3 record(s) written, 0 skipped",
                     "  test: 3 record(s) written, 0 skipped"],
        "faces_expr": ["  train: 4 record(s) written, 0 skipped",
                       "  validation: 4 record(s) written, 0 skipped",
                       "  test: 3 record(s) written, 1 skipped (1 unreadable image)"]}

    def eval_keys(config):
        batches = pipeline.build_eval_batches(config, split="test", process_index=0,
                                              process_count=1)
        return [(k, int(s)) for b in batches
                for k, s, v in zip(b["key"], b["source"], b["valid"]) if v > 0]

    raw = _config(tiny_config, roots)
    config = _config(tiny_config.copy_and_resolve_references(), {n: "" for n in roots})
    for name in roots:
        config.data.sources[name].prepared = str(data_dir / name)
    config_checks.validate(config, num_devices=1, num_processes=1)
    kind_prepared = _config(tiny_config.copy_and_resolve_references(), {})
    with kind_prepared.unlocked():
        kind_prepared.data.sources = type(config.data.sources)({
            name: pipeline.prepared_source("manifest", str(data_dir / name)) for name in roots})
    config_checks.validate(kind_prepared, num_devices=1, num_processes=1)
    # The corrupt test image (faces_expr img/2.png) was found at preparation and left out.
    assert eval_keys(config) == eval_keys(raw) == eval_keys(kind_prepared) == [
        ("img/2.png", 0), ("img/5.png", 0), ("img/8.png", 0), ("img/5.png", 1),
        ("img/8.png", 1), ("img/11.png", 1)]

    # The raw preparation at the training size feeds the same pixels, without decoding.
    size = config.data.image_size
    for name, root in roots.items():
        prepare.prepare("manifest", root, data_dir / name, {"image_size": size})
    raw_prepared = config.copy_and_resolve_references()
    for name in roots:
        raw_prepared.data.sources[name].prepared_image_size = size
    assert config_checks.validate(raw_prepared, num_devices=1, num_processes=1) == []
    # A preparation at another size is read, resized on the host each time: said at the start.
    other = raw_prepared.copy_and_resolve_references()
    other.data.sources.faces_au.prepared_image_size = size * 2
    assert config_checks.validate(other, num_devices=1, num_processes=1) == [
        f"data.sources.faces_au.prepared_image_size is {size * 2}, data.image_size {size}: "
        f"every face is resized on the host each time it is read; prepare a copy at {size} "
        f"(fbnet prepare --option image_size={size}) to read faces as stored"]
    source = pipeline.build_source("faces_au", raw_prepared.data.sources.faces_au, split="test",
                                   aus=config.data.aus, source_index=0)
    assert source[0]["image"].shape == (size, size, 3) and "image_bytes" not in source[0]

    def eval_images(config):
        batches = pipeline.build_eval_batches(config, split="test", process_index=0,
                                              process_count=1)
        return np.concatenate([b["image"][b["valid"] > 0] for b in batches])

    np.testing.assert_array_equal(eval_images(raw_prepared), eval_images(config))


def test_train_batches_of_raw_preparations_are_the_datasets_batches(tiny_config, tmp_path,
                                                                    monkeypatch):
    roots = _two_datasets(tmp_path)
    config = _config(tiny_config, roots)
    config.data.sources.faces_expr.balance_expressions = True
    config.data.global_batch_size = 6
    raw_prepared = config.copy_and_resolve_references()
    for name, root in roots.items():
        prepare.prepare("manifest", root, tmp_path / name, {"image_size": 16})
        raw_prepared.data.sources[name].prepared = str(tmp_path / name)
        raw_prepared.data.sources[name].prepared_image_size = 16
    config.data.image_size = raw_prepared.data.image_size = 16

    def batches(config, process_index=0, process_count=1):
        with contextlib.closing(pipeline.build_train_iterator(
                config, process_index=process_index, process_count=process_count,
                start_step=3)) as it:
            return [next(it) for _ in range(12)]

    # The datasets decoded one record at a time (no source of theirs has a batched read) and
    # their raw preparations read in batches (`_getitems`, pixels as stored) give equal batches.
    expected = batches(config)
    for got, want in zip(batches(raw_prepared), expected):
        assert sorted(got) == sorted(want)
        for field in want:
            np.testing.assert_array_equal(got[field], want[field], err_msg=field)
            assert got[field].dtype == want[field].dtype, field
    # And so do they with every read made one example at a time, through grain's own
    # per-element path, on one process or split over two.
    monkeypatch.setattr("data_pipelines.mixture._ProcessBatches._read",
                        lambda self, indices: [self._parent[i] for i in indices])
    for process_count in (1, 2):
        halves = [batches(raw_prepared, p, process_count) for p in range(process_count)]
        for n, want in enumerate(expected):
            for field in want:
                np.testing.assert_array_equal(
                    np.concatenate([h[n][field] for h in halves]), want[field], err_msg=field)


def test_prepared_source_entries(tiny_config, tmp_path):
    entry = pipeline.prepared_source("manifest", str(tmp_path), weight=0.5, seed=2)
    assert entry.to_dict() == {"kind": "prepared", "dataset": "manifest", "data_dir": str(tmp_path),
                               "weight": 0.5, "margin": 0.2, "balance_expressions": False,
                               "prepared_image_size": 0,
                               "options": {"validation_fraction": 0.1, "test_fraction": 0.1,
                                           "seed": 2}}
    config = _config(tiny_config, {})
    with config.unlocked():
        config.data.sources = type(config.data.sources)({
            "a": pipeline.prepared_source("manifest"),
            "b": pipeline.prepared_source("manifest", str(tmp_path / "no")),
            "c": pipeline.prepared_source("manifest", str(tmp_path))})
    config.data.sources.c.dataset = "rafdbb"
    config.data.sources.c.prepared_image_size = -3
    with pytest.raises(ConfigError) as error:
        config_checks.validate(config, num_devices=1, num_processes=1)
    assert str(error.value).splitlines()[1:] == [
        "  - data.sources.a.data_dir: empty; give the --data_dir of fbnet prepare with "
        "--config.data.sources.a.data_dir=/path/to/it",
        f"  - data.sources.b.data_dir: {tmp_path / 'no'} is not a folder (the --data_dir of "
        "fbnet prepare)",
        "  - data.sources.c.dataset: unknown dataset 'rafdbb'; known: affectnet, affwild2, bp4d, "
        "bp4d_plus, ckplus, disfa, emotionet, expw, fer2013, ferplus, manifest, rafdb, "
        "rafdb_compound"]
    config.data.sources.c.dataset = "manifest"
    with pytest.raises(ConfigError) as error:
        config_checks.validate(config, num_devices=1, num_processes=1)
    assert str(error.value).splitlines()[-1] == (
        "  - data.sources.c.prepared_image_size: must be an int >= 0 (0: the preparation of "
        "faces as served), got -3")


def test_a_dataset_split_is_read_once_per_process(tiny_config, tmp_path, caplog):
    config = _config(tiny_config, _two_datasets(tmp_path))
    with caplog.at_level(logging.INFO):
        for _ in range(3):  # as three periodic evaluations do
            list(pipeline.build_eval_batches(config, split="validation", process_index=0,
                                             process_count=1))
    built = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("source faces_expr: manifest [validation]")]
    assert len(built) == 1, built
