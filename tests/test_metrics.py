"""Metric maths against scikit-learn and direct formulas; evaluate_arrays; StepMeans."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from fbnet_jax.eval import metrics
from fbnet_jax.core import taxonomy

SEEDS = range(5)


def _masked_classes(seed, n, num_classes, drop_class=None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    if drop_class is not None:
        labels[labels == drop_class] = (drop_class + 1) % num_classes
    # Predictions agree with labels half of the time, so F1 values are far from 0 and 1.
    predictions = np.where(rng.random(n) < 0.5, labels, rng.integers(0, num_classes, n))
    mask = (rng.random(n) < 0.7).astype(np.float32)
    return labels, predictions, mask


@pytest.mark.parametrize("seed", SEEDS)
def test_expression_metrics_match_sklearn(seed):
    labels, predictions, mask = _masked_classes(seed, 150, 7, drop_class=seed % 7)
    keep = mask > 0
    y, p = labels[keep], predictions[keep]
    result = metrics.expression_metrics(labels, predictions, mask)
    classes = list(range(7))
    assert result["count"] == keep.sum()
    np.testing.assert_allclose(result["accuracy"], skm.accuracy_score(y, p))
    macro_f1 = skm.f1_score(y, p, labels=classes, average="macro", zero_division=0)
    np.testing.assert_allclose(result["macro_f1"], macro_f1)
    np.testing.assert_allclose(
        [result["f1"][name] for name in taxonomy.EXPRESSIONS],
        skm.f1_score(y, p, labels=classes, average=None, zero_division=0))
    np.testing.assert_array_equal(result["confusion_matrix"],
                                  skm.confusion_matrix(y, p, labels=classes))
    np.testing.assert_allclose(result["score"], 0.67 * macro_f1 + 0.33 * skm.accuracy_score(y, p))


@pytest.mark.parametrize("seed", SEEDS)
def test_compound_metrics_match_sklearn(seed):
    labels, predictions, mask = _masked_classes(100 + seed, 120, 11, drop_class=seed)
    keep = mask > 0
    y, p = labels[keep], predictions[keep]
    result = metrics.compound_metrics(labels, predictions, mask)
    np.testing.assert_allclose(result["accuracy"], skm.accuracy_score(y, p))
    np.testing.assert_allclose(result["uar"], skm.recall_score(
        y, p, labels=np.unique(y), average="macro", zero_division=0))
    np.testing.assert_allclose(result["macro_f1"], skm.f1_score(
        y, p, labels=list(range(11)), average="macro", zero_division=0))


def test_classification_metrics_refuse_empty_sets_and_bad_labels():
    with pytest.raises(ValueError, match="no labelled"):
        metrics.expression_metrics(np.zeros(3), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="outside"):
        metrics.expression_metrics(np.array([7, 0]), np.array([0, 0]), np.ones(2))
    # An out-of-range value on a masked row is not a label.
    metrics.expression_metrics(np.array([-1, 0]), np.array([0, 0]), np.array([0, 1]))


def _au_data(seed, n=200, num_aus=17):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, num_aus)) < 0.3).astype(np.float32)
    # Probabilities that carry some signal about the labels.
    probabilities = np.clip(0.35 * labels + 0.65 * rng.random((n, num_aus)), 0, 1)
    mask = (rng.random((n, num_aus)) < 0.6).astype(np.float32)
    mask[:, 3] = 0.0      # an AU nobody labels
    labels[:, 5] = 0.0    # an AU labelled only negative
    return labels, probabilities, mask


@pytest.mark.parametrize("seed", SEEDS)
def test_au_metrics_match_sklearn(seed):
    labels, probabilities, mask = _au_data(seed)
    thresholds = 0.5 if seed % 2 else np.random.default_rng(seed).uniform(0.3, 0.7, 17)
    result = metrics.au_metrics(labels, probabilities, mask, thresholds)
    predicted = probabilities >= np.broadcast_to(thresholds, (17,))
    keep = mask > 0
    expected_f1 = {}
    for i, name in enumerate(metrics.DEFAULT_AU_NAMES):
        if keep[:, i].any():
            expected_f1[name] = skm.f1_score(labels[keep[:, i], i], predicted[keep[:, i], i],
                                             zero_division=0)
    assert set(result["f1"]) == set(expected_f1) and "AU5" not in result["f1"]  # column 3
    np.testing.assert_allclose([result["f1"][k] for k in expected_f1], list(expected_f1.values()))
    np.testing.assert_allclose(result["mean_f1"], np.mean(list(expected_f1.values())))
    accuracy = skm.accuracy_score(labels[keep], predicted[keep])
    np.testing.assert_allclose(result["accuracy"], accuracy)
    np.testing.assert_allclose(result["score"], 0.5 * result["mean_f1"] + 0.5 * accuracy)
    assert result["label_count"] == keep.sum()
    assert result["count"] == keep.any(axis=1).sum()


@pytest.mark.parametrize("seed", SEEDS)
def test_choose_au_thresholds_maximises_f1_on_the_grid(seed):
    labels, probabilities, mask = _au_data(seed, n=120)
    grid = np.linspace(0.05, 0.95, 19)
    chosen = metrics.choose_au_thresholds(labels, probabilities, mask, grid)
    assert chosen.shape == (17,)
    keep = mask > 0
    for i in range(17):
        if not keep[:, i].any():
            assert chosen[i] == 0.5
            continue
        y, p = labels[keep[:, i], i], probabilities[keep[:, i], i]
        f1_at = {t: skm.f1_score(y, p >= t, zero_division=0) for t in grid}
        assert chosen[i] in grid
        np.testing.assert_allclose(f1_at[chosen[i]], max(f1_at.values()))
    # All-negative AU: F1 is 0 at every threshold; ties go to the grid value nearest 0.5.
    assert chosen[5] == pytest.approx(0.5)


def test_default_threshold_grid_keeps_an_exact_half():
    labels, probabilities, mask = _au_data(0, n=50)
    chosen = metrics.choose_au_thresholds(labels, probabilities, mask)
    assert chosen[5] == 0.5 and chosen[3] == 0.5
    assert set(chosen) <= set(np.round(np.arange(1, 20) * 0.05, 2))


@pytest.mark.parametrize("seed", SEEDS)
def test_va_metrics_match_direct_formulas(seed):
    rng = np.random.default_rng(seed)
    labels = rng.uniform(-1, 1, (90, 2))
    predictions = np.clip(0.6 * labels + rng.normal(0.1, 0.3, (90, 2)), -1, 1)
    mask = (rng.random(90) < 0.6).astype(np.float32)
    result = metrics.va_metrics(labels, predictions, mask)
    keep = mask > 0
    assert result["count"] == keep.sum()
    cccs = []
    for i, name in enumerate(("valence", "arousal")):
        x, y = predictions[keep, i], labels[keep, i]
        ccc = 2 * np.cov(x, y, bias=True)[0, 1] / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)
        cccs.append(ccc)
        np.testing.assert_allclose(result[f"ccc_{name}"], ccc)
        np.testing.assert_allclose(result[f"pearson_{name}"], np.corrcoef(x, y)[0, 1])
        np.testing.assert_allclose(result[f"rmse_{name}"], np.sqrt(np.mean((x - y) ** 2)))
    np.testing.assert_allclose(result["mean_ccc"], np.mean(cccs))


def test_va_metrics_with_one_example_are_finite():
    result = metrics.va_metrics(np.array([[0.5, -0.5], [0.0, 0.0]]),
                                np.array([[0.1, 0.2], [0.3, 0.3]]), np.array([1, 0]))
    assert result["ccc_valence"] == 0.0 and result["pearson_arousal"] == 0.0
    np.testing.assert_allclose(result["rmse_valence"], 0.4)
    with pytest.raises(ValueError, match="no labelled"):
        metrics.va_metrics(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros(2))


def test_flatten_names_scalars_and_per_class_entries_and_drops_arrays():
    flat = metrics.flatten({"count": 3, "accuracy": np.float64(0.5), "f1": {"Anger": 0.25},
                            "confusion_matrix": np.eye(2)}, "test/expression")
    assert flat == {"test/expression_count": 3.0, "test/expression_accuracy": 0.5,
                    "test/expression_f1/Anger": 0.25}
    assert all(type(v) is float for v in flat.values())


SOURCES = ("affectnet", "disfa", "affwild2", "unused")


def _eval_set(seed, with_compound):
    """Three sources labelling different tasks, plus padding rows that would change every metric."""
    rng = np.random.default_rng(seed)
    per_source, padding = 30, 10
    n = 3 * per_source + padding
    source = np.concatenate([np.repeat([0, 1, 2], per_source), np.zeros(padding, int)])
    valid = np.concatenate([np.ones(3 * per_source), np.zeros(padding)]).astype(np.float32)
    expression_mask = np.isin(source, (0, 2)).astype(np.float32)
    au_mask = np.zeros((n, 17), np.float32)
    au_mask[source == 1] = np.isin(taxonomy.AUS, taxonomy.DATASET_AUS["disfa"])
    au_mask[source == 2] = np.isin(taxonomy.AUS, taxonomy.DATASET_AUS["affwild2"])
    va_mask = np.isin(source, (0, 2)).astype(np.float32)
    compound_mask = (source == 2).astype(np.float32)
    padding_rows = valid == 0
    for mask in (expression_mask, au_mask, va_mask, compound_mask):
        mask[padding_rows] = 1.0  # padding pretends to be labelled: only `valid` excludes it
    batch = {
        "expression": rng.integers(0, 7, n).astype(np.int32),
        "expression_mask": expression_mask,
        "au": ((rng.random((n, 17)) < 0.3) * au_mask).astype(np.float32),
        "au_mask": au_mask,
        "va": (rng.uniform(-1, 1, (n, 2)) * va_mask[:, None]).astype(np.float32),
        "va_mask": va_mask,
        "compound": rng.integers(0, 11, n).astype(np.int32),
        "compound_mask": compound_mask,
        "source": source.astype(np.int32),
        "valid": valid,
    }
    one_hot = np.eye(7)[batch["expression"]]
    outputs = {
        "expression_logits": (2 * one_hot + rng.normal(size=(n, 7))).astype(np.float32),
        "au_logits": (2 * batch["au"] - 1 + rng.normal(size=(n, 17))).astype(np.float32),
        "va": np.tanh(batch["va"] + rng.normal(0, 0.3, (n, 2))).astype(np.float32),
    }
    # Padding rows: predictions that are wrong everywhere, so including them would show.
    outputs["expression_logits"][padding_rows] = -10 * one_hot[padding_rows]
    outputs["au_logits"][padding_rows] = 10 * (1 - 2 * batch["au"][padding_rows])
    outputs["va"][padding_rows] = -batch["va"][padding_rows]
    if with_compound:
        outputs["compound_logits"] = rng.normal(size=(n, 11)).astype(np.float32)
    return outputs, batch


def _subset(tree, rows):
    return {name: np.asarray(value)[rows] for name, value in tree.items()}


def _expected(outputs, batch, key):
    """The flat metrics of a subset, from the metric functions on its rows."""
    expected = {}
    if batch["expression_mask"].any():
        expected.update(metrics.flatten(metrics.expression_metrics(
            batch["expression"], outputs["expression_logits"].argmax(-1),
            batch["expression_mask"]), f"{key}/expression"))
    if batch["au_mask"].any():
        expected.update(metrics.flatten(metrics.au_metrics(
            batch["au"], 1 / (1 + np.exp(-outputs["au_logits"].astype(np.float64))),
            batch["au_mask"]), f"{key}/au"))
    if batch["va_mask"].any():
        expected.update(metrics.flatten(metrics.va_metrics(
            batch["va"], outputs["va"], batch["va_mask"]), f"{key}/va"))
    if "compound_logits" in outputs and batch["compound_mask"].any():
        expected.update(metrics.flatten(metrics.compound_metrics(
            batch["compound"], outputs["compound_logits"].argmax(-1),
            batch["compound_mask"]), f"{key}/compound"))
    return expected


@pytest.mark.parametrize("with_compound", [False, True])
def test_evaluate_arrays_excludes_padding_and_reports_each_source(with_compound):
    outputs, batch = _eval_set(0, with_compound)
    result = metrics.evaluate_arrays(outputs, batch, SOURCES)
    assert all(type(value) is float and np.isfinite(value) for value in result.values())

    valid = batch["valid"] > 0
    expected = _expected(_subset(outputs, valid), _subset(batch, valid), "test")
    for index, name in enumerate(SOURCES):
        rows = valid & (batch["source"] == index)
        expected.update(_expected(_subset(outputs, rows), _subset(batch, rows), f"test/{name}"))
    assert set(result) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(result[key], value, rtol=1e-12, err_msg=key)

    # Padding would change the result if it were counted.
    with_padding = metrics.evaluate_arrays(outputs, dict(batch, valid=np.ones_like(batch["valid"])),
                                           SOURCES)
    assert with_padding["test/expression_accuracy"] < result["test/expression_accuracy"]
    assert with_padding["test/expression_count"] == result["test/expression_count"] + 10

    # Keys of a task exist exactly where that task has labels.
    assert result["test/expression_count"] == 60.0 and result["test/va_count"] == 60.0
    assert "test/affectnet/expression_f1/Neutral" in result
    assert "test/affectnet/va_ccc_arousal" in result
    assert not any(key.startswith("test/affectnet/au_") for key in result)
    assert not any(key.startswith(("test/disfa/expression", "test/disfa/va")) for key in result)
    assert "test/disfa/au_f1/AU9" in result and "test/disfa/au_f1/AU7" not in result
    assert "test/affwild2/au_f1/AU7" in result and "test/affwild2/au_f1/AU9" not in result
    assert result["test/disfa/au_count"] == 30.0
    assert not any(key.startswith("test/unused/") for key in result)
    compound_keys = {key for key in result if "/compound_" in key}
    if with_compound:
        assert compound_keys == {f"test{infix}/compound_{metric}" for infix in ("", "/affwild2")
                                 for metric in ("count", "accuracy", "uar", "macro_f1")}
    else:
        assert not compound_keys


def test_evaluate_arrays_uses_au_thresholds_and_prefix():
    outputs, batch = _eval_set(1, with_compound=False)
    thresholds = np.full(17, 0.9)
    result = metrics.evaluate_arrays(outputs, batch, SOURCES, prefix="validation",
                                     au_thresholds=thresholds)
    valid = batch["valid"] > 0
    au = metrics.au_metrics(batch["au"][valid], 1 / (1 + np.exp(-outputs["au_logits"][valid])),
                            batch["au_mask"][valid], thresholds)
    np.testing.assert_allclose(result["validation/au_mean_f1"], au["mean_f1"], rtol=1e-12)
    assert all(key.startswith("validation/") for key in result)


def test_confusion_matrices_per_subset():
    outputs, batch = _eval_set(2, with_compound=True)
    matrices = metrics.confusion_matrices(outputs, batch, SOURCES)
    assert set(matrices) == {"test/expression", "test/affectnet/expression",
                             "test/affwild2/expression", "test/compound",
                             "test/affwild2/compound"}
    rows = (batch["valid"] > 0) & (batch["source"] == 0)
    np.testing.assert_array_equal(matrices["test/affectnet/expression"], skm.confusion_matrix(
        batch["expression"][rows], outputs["expression_logits"][rows].argmax(-1),
        labels=list(range(7))))
    assert matrices["test/compound"].shape == (11, 11)


def test_step_means_accumulate_under_jit_and_leave_skipped_steps_out():
    @jax.jit
    def step(x, keep):
        return metrics.StepMeans.from_step({"loss": x, "double": 2 * x}, keep)

    merge = jax.jit(lambda a, b: a.merge(b))
    running = metrics.StepMeans.empty()
    assert running.compute() == {}
    # keep flags: steps 1, 2 and 4, 5, 6 are skipped (their values are NaN and must not count).
    values = [1.0, np.nan, np.nan, 2.0, np.nan, np.nan, np.nan, 6.0]
    keeps = [True, False, False, True, False, False, False, True]
    for x, keep in zip(values, keeps):
        running = merge(running, step(jnp.float32(x), keep))
    assert int(running.steps) == 8 and int(running.skipped) == 5
    assert int(running.longest_skip_run) == 3
    assert running.compute() == {"loss": 3.0, "double": 6.0}
    assert running.merge(metrics.StepMeans.empty()) is running
    with pytest.raises(ValueError, match="cannot merge"):
        running.merge(metrics.StepMeans.from_step({"other": 1.0}))


@pytest.mark.parametrize("split", [1, 2, 3, 5, 6])
def test_step_means_count_runs_of_skipped_steps_across_any_grouping(split):
    keeps = [True, False, False, True, False, False, False, True, False]
    parts = [metrics.StepMeans.from_step({"loss": 1.0}, k) for k in keeps]

    def merged(items):
        out = metrics.StepMeans.empty()
        for item in items:
            out = out.merge(item)
        return out

    left, right = merged(parts[:split]), merged(parts[split:])
    whole = left.merge(right)
    assert (int(whole.longest_skip_run), int(whole.leading), int(whole.trailing)) == (3, 0, 1)
    assert int(whole.skipped) == 6 and whole.compute() == {"loss": 1.0}
    all_skipped = metrics.StepMeans.from_step({"loss": np.nan}, False)
    assert math.isnan(all_skipped.compute()["loss"])


def test_tuned_au_metrics_apply_validation_thresholds_to_the_test_set():
    rng = np.random.default_rng(7)
    n, a = 300, 4
    aus = (1, 2, 4, 6)

    def split(shift):
        labels = rng.integers(0, 2, (n, a)).astype(np.float32)
        logits = (labels - 0.5) * 2 + shift + rng.normal(0, 1.5, (n, a))
        mask = (rng.random((n, a)) < 0.8).astype(np.float32)
        valid = np.ones(n, np.float32)
        valid[-10:] = 0  # padding rows: garbage that must not count
        return {"au_logits": logits}, {"au": labels, "au_mask": mask, "valid": valid}

    tune_outputs, tune_batch = split(shift=-1.0)  # biased logits: 0.5 is not the best threshold
    outputs, batch = split(shift=-1.0)
    results = metrics.tuned_au_metrics(tune_outputs, tune_batch, outputs, batch, aus, "test")
    keep = tune_batch["valid"][:, None] > 0
    expected_thresholds = metrics.choose_au_thresholds(
        tune_batch["au"], metrics.sigmoid(tune_outputs["au_logits"]), tune_batch["au_mask"] * keep)
    for au, t in zip(aus, expected_thresholds):
        assert results[f"test/au_threshold/AU{au}"] == pytest.approx(t)
    assert any(t != 0.5 for t in expected_thresholds)
    expected = metrics.au_metrics(
        batch["au"], metrics.sigmoid(outputs["au_logits"]),
        batch["au_mask"] * (batch["valid"][:, None] > 0), expected_thresholds,
        [f"AU{au}" for au in aus])
    assert results["test/au_tuned_mean_f1"] == pytest.approx(expected["mean_f1"])
    assert results["test/au_tuned_accuracy"] == pytest.approx(expected["accuracy"])
    # Tuned thresholds do at least as well as 0.5 on the set they were tuned on.
    at_half = metrics.au_metrics(tune_batch["au"], metrics.sigmoid(tune_outputs["au_logits"]),
                                 tune_batch["au_mask"] * keep, 0.5, [f"AU{au}" for au in aus])
    tuned_on_itself = metrics.tuned_au_metrics(tune_outputs, tune_batch, tune_outputs, tune_batch,
                                               aus, "v")
    assert tuned_on_itself["v/au_tuned_mean_f1"] >= at_half["mean_f1"]
    # No AU label in either set: no keys.
    empty = dict(batch, au_mask=np.zeros_like(batch["au_mask"]))
    assert metrics.tuned_au_metrics(tune_outputs, tune_batch, outputs, empty, aus, "t") == {}
