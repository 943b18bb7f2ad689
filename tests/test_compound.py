"""Zero- and few-shot compound expressions (fbnet_jax/eval/compound.py)."""

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from fbnet_jax.eval import compound
from fbnet_jax.core import taxonomy

CLASSES = np.arange(compound.NUM_CLASSES)


def _peaked_expressions(classes):
    """Expression probabilities [N, 7]: 0.45 on each of the compound's two components."""
    probs = np.full((len(classes), len(taxonomy.EXPRESSIONS)), 0.02)
    components = taxonomy.compound_components()[classes]
    np.put_along_axis(probs, components, 0.45, axis=1)
    return probs


def _outputs_from_table(classes, features=None):
    """Network outputs whose AU probabilities are each compound's table row."""
    au_probs = np.clip(taxonomy.compound_relatedness()[classes], 0.01, 0.99)
    outputs = {"expression_logits": np.log(_peaked_expressions(classes)),
               "au_logits": np.log(au_probs / (1 - au_probs))}
    outputs["features"] = (np.zeros((len(classes), 4)) if features is None else features)
    return outputs


def _batch(labels, source=None, valid=None, mask=None):
    n = len(labels)
    return {"compound": np.asarray(labels), "compound_mask": np.ones(n) if mask is None else mask,
            "source": np.zeros(n, int) if source is None else np.asarray(source),
            "valid": np.ones(n) if valid is None else valid}


def _clusters(per_class, dim=8, spread=0.05, seed=0):
    """Features: one tight cluster per class around a random centre."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((compound.NUM_CLASSES, dim))
    labels = np.repeat(CLASSES, per_class)
    return centres[labels] + spread * rng.standard_normal((len(labels), dim)), labels


# --------------------------------------------------------------------------------------------
# Zero-shot.

@pytest.mark.parametrize("au_weight, expression_weight", [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0)])
def test_zero_shot_recovers_every_compound_from_its_table_row(au_weight, expression_weight):
    scores = compound.zero_shot_scores(_peaked_expressions(CLASSES),
                                       taxonomy.compound_relatedness(), taxonomy.AUS,
                                       au_weight=au_weight, expression_weight=expression_weight)
    np.testing.assert_array_equal(scores.argmax(-1), CLASSES)


def test_zero_shot_score_is_the_documented_formula():
    aus = (12, 14)   # AU12: prototypical of Happily Surprised/Disgusted; AU14: in no row
    au_probs = np.array([[0.8, 0.3]])
    expression_probs = np.array([[0.1, 0.0, 0.2, 0.05, 0.4, 0.05, 0.2]])  # Anger underflowed
    scores = compound.zero_shot_scores(expression_probs, au_probs, aus)
    au_listed = 0.8 * math.log(0.95) + 0.2 * math.log(0.05)      # AU12 at the ceiling
    au_unlisted = 0.8 * math.log(0.05) + 0.2 * math.log(0.95)    # AU12 at the floor
    au14 = 0.3 * math.log(0.05) + 0.7 * math.log(0.95)
    assert scores.shape == (1, 11)
    # Happily Surprised: Happiness 0.4, Surprise 0.2.
    assert scores[0, 0] == pytest.approx(au_listed + au14 + math.log(0.4) + math.log(0.2), 1e-12)
    # Angrily Disgusted: Anger 0 is floored at 1e-6, Disgust 0.2.
    assert scores[0, 9] == pytest.approx(au_unlisted + au14 + math.log(1e-6) + math.log(0.2),
                                         1e-12)


def test_zero_shot_rejects_columns_that_are_not_the_au_list():
    with pytest.raises(ValueError, match=r"au_probs must be \[N, 17\]"):
        compound.zero_shot_scores(np.full((2, 7), 1 / 7), np.full((2, 12), 0.5))
    with pytest.raises(ValueError, match=r"expression_probs must be \[N, 7\]"):
        compound.zero_shot_scores(np.full((2, 8), 1 / 8), np.full((2, 17), 0.5))


def test_zero_shot_metrics_are_exact_and_use_only_labelled_rows_of_each_source():
    # Rows 0..10: each compound with its own evidence; row 11: a Happily Surprised face (0)
    # with the evidence of Happily Disgusted (1); row 12 padding, row 13 unlabelled, row 14 of
    # another source: all three carry evidence of class 5 and must not count.
    evidence = np.concatenate([CLASSES, [1, 5, 5, 5]])
    labels = np.concatenate([CLASSES, [0, 0, 0, 0]])
    batch = _batch(labels, source=[0] * 14 + [1], valid=np.r_[np.ones(12), 0, 1, 1],
                   mask=np.r_[np.ones(13), 0, 1])
    results = compound.zero_shot_evaluation(_outputs_from_table(evidence), batch, ["a", "b"],
                                            prefix="test")
    p = "test/a/compound_"
    assert results == pytest.approx({
        f"{p}count": 12.0, f"{p}chance_uar": 1 / 11,
        f"{p}zero_shot_accuracy": 11 / 12,
        f"{p}zero_shot_uar": (0.5 + 10) / 11,                   # class 0 recalled 1 of 2
        f"{p}zero_shot_macro_f1": (9 + 2 / 3 + 2 / 3) / 11,     # classes 0 and 1: F1 2/3
        f"{p}zero_shot_au_uar": (0.5 + 10) / 11,
        f"{p}zero_shot_expression_uar": (0.5 + 10) / 11,
        # source b: one face of class 0 scored as class 5.
        "test/b/compound_count": 1.0, "test/b/compound_chance_uar": 1 / 11,
        "test/b/compound_zero_shot_accuracy": 0.0, "test/b/compound_zero_shot_uar": 0.0,
        "test/b/compound_zero_shot_macro_f1": 0.0, "test/b/compound_zero_shot_au_uar": 0.0,
        "test/b/compound_zero_shot_expression_uar": 0.0,
    }, abs=1e-12)
    # Few-shot on the same rows: no k has 2 classes with k + 1 faces, so only the counts.
    assert compound.few_shot_evaluation(_outputs_from_table(evidence), batch, ["a", "b"],
                                        prefix="test") == {
        f"{p}count": 12.0, f"{p}chance_uar": 1 / 11,
        "test/b/compound_count": 1.0, "test/b/compound_chance_uar": 1 / 11}


# --------------------------------------------------------------------------------------------
# Few-shot.

def test_few_shot_on_separable_features_is_perfect():
    features, labels = _clusters(per_class=12)
    result = compound.few_shot(features, labels, k=5, draws=5, seed=0)
    assert result == {"classes": 11.0, "query_count": 11.0 * 7,
                      "linear_uar": 1.0, "linear_uar_std": 0.0,
                      "linear_accuracy": 1.0, "linear_accuracy_std": 0.0,
                      "ncm_uar": 1.0, "ncm_uar_std": 0.0,
                      "ncm_accuracy": 1.0, "ncm_accuracy_std": 0.0}


def test_few_shot_on_random_features_is_near_chance():
    rng = np.random.default_rng(1)
    labels = np.repeat(CLASSES, 40)
    features = rng.standard_normal((len(labels), 16))
    result = compound.few_shot(features, labels, k=5, draws=5, seed=0)
    for method in ("linear", "ncm"):
        assert abs(result[f"{method}_uar"] - 1 / 11) < 0.04, result
        assert result[f"{method}_uar_std"] > 0


def test_few_shot_is_deterministic_and_the_seed_picks_the_supports():
    rng = np.random.default_rng(2)
    labels = np.repeat(CLASSES, 20)
    features = rng.standard_normal((len(labels), 6)) + 0.7 * np.eye(11, 6)[labels]
    first = compound.few_shot(features, labels, k=5, seed=3)
    assert compound.few_shot(features, labels, k=5, seed=3) == first
    assert compound.few_shot(features, labels, k=5, seed=4) != first


def test_few_shot_leaves_out_classes_with_fewer_than_k_plus_1_faces():
    features, labels = _clusters(per_class=6)
    keep = (labels != 3) | (np.arange(len(labels)) % 6 == 0)  # class 3: a single face
    keep &= (labels != 7) | (np.arange(len(labels)) % 6 < 5)  # class 7: exactly k = 5 faces
    result = compound.few_shot(features[keep], labels[keep], k=5, draws=2)
    assert result["classes"] == 9 and result["query_count"] == 9
    assert result["linear_uar"] == 1.0
    # At k = 1 only class 3 is left out: its one face would be support with nothing to score.
    assert compound.few_shot(features[keep], labels[keep], k=1, draws=2)["classes"] == 10
    with pytest.raises(ValueError, match="needs 2 classes with at least 6 examples"):
        compound.few_shot(features[labels < 2][:7], labels[labels < 2][:7], k=5)


def test_the_linear_probe_reaches_the_regularised_optimum():
    # scikit-learn minimises |θ|²/2 + C·Σ CE. With a column of ones standing for the (penalised)
    # bias and C = 1/(n·l2), that is n/l2 times the probe's mean CE + l2/2·|θ|²: same optimum.
    rng = np.random.default_rng(5)
    n, dim, classes, l2 = 40, 30, 4, 0.05
    x = rng.standard_normal((n, dim)) @ (np.eye(dim) + 0.3 * rng.standard_normal((dim, dim)))
    y = np.arange(n) % classes
    x[:, 0] += y
    w, b = compound.fit_logistic(x, y, classes, l2)
    reference = LogisticRegression(C=1 / (n * l2), fit_intercept=False, tol=1e-12,
                                   max_iter=100_000).fit(np.hstack([x, np.ones((n, 1))]), y)
    np.testing.assert_allclose(w, reference.coef_[:, :-1].T, atol=1e-6)
    np.testing.assert_allclose(b, reference.coef_[:, -1], atol=1e-6)


def test_nearest_class_mean_uses_cosine_on_normalised_features():
    # Class 0: (10, 0) and (0, 1), whose normalised mean points at 45 degrees (the raw mean
    # (5, 0.5) at 6); class 1: one face at 10 degrees. The query at 31 degrees is 14 degrees from
    # class 0's direction and 21 from class 1's; averaging raw features (25 degrees from it) or
    # Euclidean distance (4.0 against 0.4) would pick class 1.
    support = np.array([[10.0, 0.0], [0.0, 1.0], [1.0, math.tan(math.radians(10))]])
    predicted = compound.nearest_class_mean(support, np.array([0, 0, 1]), np.array([[1.0, 0.6]]))
    np.testing.assert_array_equal(predicted, [0])


# --------------------------------------------------------------------------------------------
# Keys and the run.

def _expected_keys(prefix, source, ks):
    p = f"{prefix}/{source}/compound_"
    keys = {p + s for s in ("count", "chance_uar", "zero_shot_accuracy", "zero_shot_uar",
                            "zero_shot_macro_f1", "zero_shot_au_uar", "zero_shot_expression_uar")}
    for k in ks:
        keys.add(f"{p}few_shot_k{k}_classes")
        for infix in ("", "ncm_"):
            keys |= {f"{p}few_shot_{infix}k{k}_{stat}"
                     for stat in ("uar", "uar_std", "accuracy", "accuracy_std")}
    return keys


def test_keys_are_exact_and_few_shot_values_come_from_few_shot():
    features, labels = _clusters(per_class=8)
    outputs = _outputs_from_table(labels, features)
    batch = _batch(labels, source=np.ones(len(labels), int))
    zero = compound.zero_shot_evaluation(outputs, batch, ["basic", "compound"], prefix="val")
    few = compound.few_shot_evaluation(outputs, batch, ["basic", "compound"], prefix="val",
                                       ks=(1, 5), draws=2, seed=7)
    p = "val/compound/compound_"
    assert set(zero) | set(few) == _expected_keys("val", "compound", (1, 5))
    assert not any("few_shot" in key for key in zero)
    assert {key for key in few if "few_shot" not in key} == {p + "count", p + "chance_uar"}
    assert few[p + "few_shot_k5_classes"] == 11
    shot = compound.few_shot(features, labels, k=5, draws=2, seed=7)
    assert few[p + "few_shot_ncm_k5_uar_std"] == shot["ncm_uar_std"]
    assert few[p + "few_shot_k5_uar"] == shot["linear_uar"] == 1.0


def test_the_console_report_shows_what_was_measured():
    features, labels = _clusters(per_class=8)
    outputs = _outputs_from_table(labels, features)
    batch = _batch(labels)
    zero = compound.zero_shot_evaluation(outputs, batch, ["s"], prefix="test")
    few = compound.few_shot_evaluation(outputs, batch, ["s"], prefix="test", ks=(1, 5), draws=2)
    lines = compound.format_report({**zero, **few}, "test").splitlines()
    assert lines[0] == "s: 88 compound faces, 11 classes, chance UAR 0.0909"
    assert lines[1].split() == ["zero-shot", "|", "accuracy", "|", "UAR", "|", "macro", "F1"]
    assert lines[2].split()[-5:] == ["1.0000", "|", "1.0000", "|", "1.0000"]
    assert [line.split()[0] for line in lines[5:]] == ["few-shot", "1", "5"]
    only_zero = compound.format_report(zero, "test")
    assert "few-shot" not in only_zero and "zero-shot" in only_zero
    only_few = compound.format_report(few, "test")
    assert "zero-shot" not in only_few and only_few.splitlines()[1].startswith("  few-shot")
