"""Compound expressions without compound training: zero-shot scoring and few-shot probes.

FaceBehaviorNet is trained on the 7 basic expressions and the AUs only. Its outputs still say
something about RAF-DB's 11 compound classes (`taxonomy.RAF_COMPOUND_CLASSES`):

- zero-shot (`zero_shot_scores`): each compound is scored from the network's AU probabilities
  under the compound's AU pattern (Du et al.'s table, `taxonomy.compound_relatedness`) and from
  the expression probabilities of its two basic components; the best score is the prediction.
  The rule and why it is so: docs/paper.md#compound-expressions-the-scoring-rule.
- few-shot (`few_shot`): k labelled faces per class fit a nearest class mean classifier and a
  linear probe on the network's features, scored on the other labelled faces.

`zero_shot_evaluation` and `few_shot_evaluation` turn one split's outputs into flat metric keys
per source; they are the `compound_zero_shot` and `compound_few_shot` evaluators of a config
(fbnet_jax/eval/evaluators/), which `fbnet train` and `fbnet eval` run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from fbnet_jax.eval import metrics
from fbnet_jax.core import taxonomy

NUM_CLASSES = len(taxonomy.RAF_COMPOUND_CLASSES)

# The zero-shot rule (docs/paper.md#compound-expressions-the-scoring-rule). Each compound's AU
# model is its table row clipped to [AU_FLOOR, AU_CEILING] (taxonomy.bernoulli_au_model, shared
# with distribution matching's expression side).
AU_FLOOR = taxonomy.AU_PROBABILITY_FLOOR
AU_CEILING = taxonomy.AU_PROBABILITY_CEILING
# Expression probabilities are floored here before the log, so a softmax that underflows cannot
# veto a class whatever its AUs say (the penalty of one component is at most -log 1e-6 = 13.8).
PROBABILITY_FLOOR = 1e-6
# Weights of the two log-likelihoods in the score: 1 and 1 is the naive-Bayes posterior.
AU_WEIGHT = 1.0
EXPRESSION_WEIGHT = 1.0

# The few-shot protocol (docs/paper.md#compound-expressions-the-scoring-rule).
KS = (1, 5, 10)        # labelled faces per class
DRAWS = 5              # random support sets per k
# Linear probe: mean cross-entropy + PROBE_L2 / (2 n) · |θ|² over n support faces (for 1, the
# penalty of scikit-learn's LogisticRegression default C = 1), minimised by PROBE_STEPS steps of
# Nesterov's method at step 1/L (`fit_logistic`). Each step shrinks the error by at least
# 1 − 1/√κ, κ = L / penalty ≈ σ_max² / 2 of the standardised support features: 1000 steps reach
# 1e-6 for κ up to about 5000 (on the demo network's features κ is 100 to 900 for k = 1..10).
PROBE_L2 = 1.0
PROBE_STEPS = 1000
STD_FLOOR = 1e-8       # a feature constant over the support set is centred, not scaled
NORM_FLOOR = 1e-12     # an all-zero feature vector stays zero under L2 normalisation


# --------------------------------------------------------------------------------------------
# Zero-shot.

def compound_au_model(aus: Sequence[int] = taxonomy.AUS) -> np.ndarray:
    """P(AU active | compound) [11, len(aus)]: Du et al.'s table clipped to [AU_FLOOR, AU_CEILING].

    AUs of the table outside `aus` (AU11 always) are dropped: the network gives no evidence on
    them, and naive Bayes leaves an unobserved variable out of the likelihood.
    """
    return taxonomy.bernoulli_au_model(
        taxonomy.compound_relatedness(taxonomy.RAF_COMPOUND_CLASSES, aus))


def au_log_likelihood(au_probs: np.ndarray, aus: Sequence[int] = taxonomy.AUS) -> np.ndarray:
    """[N, 11]: Σ_i p_i log q_ci + (1 − p_i) log(1 − q_ci), q = `compound_au_model(aus)`.

    The expected Bernoulli log-likelihood of the AU activations under the network's belief p
    (`taxonomy.au_log_likelihood`).
    """
    p = np.asarray(au_probs, np.float64)
    q = compound_au_model(aus)
    if p.ndim != 2 or p.shape[1] != q.shape[1]:
        raise ValueError(f"au_probs must be [N, {q.shape[1]}] (one column per AU of {list(aus)}), "
                         f"got {list(p.shape)}")
    return taxonomy.au_log_likelihood(p, q)


def expression_log_likelihood(expression_probs: np.ndarray) -> np.ndarray:
    """[N, 11]: log p(e1) + log p(e2) of each compound's two basic components."""
    p = np.asarray(expression_probs, np.float64)
    if p.ndim != 2 or p.shape[1] != len(taxonomy.EXPRESSIONS):
        raise ValueError(f"expression_probs must be [N, {len(taxonomy.EXPRESSIONS)}] (classes in "
                         f"taxonomy.EXPRESSIONS order), got {list(p.shape)}")
    log_p = np.log(np.maximum(p, PROBABILITY_FLOOR))
    return log_p[:, taxonomy.compound_components()].sum(axis=-1)


def zero_shot_scores(expression_probs: np.ndarray, au_probs: np.ndarray,
                     aus: Sequence[int] = taxonomy.AUS, *, au_weight: float = AU_WEIGHT,
                     expression_weight: float = EXPRESSION_WEIGHT) -> np.ndarray:
    """Zero-shot scores of RAF-DB's 11 compound classes; the prediction is their argmax.

    score(c) = au_weight · Σ_i [p_i log q_ci + (1 − p_i) log(1 − q_ci)]
               + expression_weight · [log p(e1_c) + log p(e2_c)]

    with p_i the network's probability of AU i, q_ci = P(AU i | c) from Du et al.'s table (listed
    AUs at their weight, at most AU_CEILING; unlisted AUs AU_FLOOR), and e1_c, e2_c the two basic
    components of c. With both weights 1 this is the log-posterior of naive Bayes with a uniform
    prior (up to a constant); docs/paper.md#compound-expressions-the-scoring-rule says why.

    Args:
      expression_probs: [N, 7] softmax of the expression logits.
      au_probs: [N, A] sigmoid of the AU logits, columns in `aus` order.
      aus: the AU numbers of the columns (the run's `config.data.aus`).
      au_weight, expression_weight: weights of the two terms (0 drops one).

    Returns:
      float64 [N, 11], classes in `taxonomy.RAF_COMPOUND_CLASSES` order.
    """
    return (au_weight * au_log_likelihood(au_probs, aus)
            + expression_weight * expression_log_likelihood(expression_probs))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# Few-shot.

def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), NORM_FLOOR)


def nearest_class_mean(support_x: np.ndarray, support_y: np.ndarray,
                       query_x: np.ndarray) -> np.ndarray:
    """Labels of the query rows: the class whose mean L2-normalised support feature is the
    closest in cosine (the mean is normalised again, so every class mean has length 1)."""
    classes = np.unique(support_y)
    s = _l2_normalise(np.asarray(support_x, np.float64))
    means = _l2_normalise(np.stack([s[support_y == c].mean(axis=0) for c in classes]))
    return classes[np.argmax(_l2_normalise(np.asarray(query_x, np.float64)) @ means.T, axis=-1)]


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float,
                 steps: int = PROBE_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression: argmin mean CE(x W + b, y) + l2/2 (|W|² + |b|²).

    The optimum's W lies in the row space of x (its gradient is xᵀG + l2·W), so the problem is
    solved exactly in the coordinates of x's r ≤ n singular vectors: steps cost O(n·r·C) whatever
    the feature size. The loss is l2-strongly convex and its gradient L-Lipschitz with
    L = (σ_max² + n) / (2n) + l2 (the softmax Hessian is at most 1/2 per direction, and the
    bias column of ones adds n to σ²), so Nesterov's method with step 1/L and momentum
    (√L − √l2) / (√L + √l2) shrinks the error by 1 − √(l2/L) a step. The bias is penalised like
    the weights, which keeps the problem strongly convex in every direction; with k faces per
    class and centred features its unpenalised optimum is near 0 anyway.

    Args:
      x: float [n, D] features (standardised by the caller).
      y: int [n] labels in 0..num_classes-1.
      num_classes: C.
      l2: the penalty (> 0).
      steps: gradient steps, from W = 0, b = 0.

    Returns:
      (W [D, C], b [C]), float64.
    """
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    keep = s > s.max(initial=0.0) * 1e-10
    z = u[:, keep] * s[keep]                                  # [n, r]: x in its own basis
    targets = np.eye(num_classes)[np.asarray(y)]
    lipschitz = (s.max(initial=0.0) ** 2 + n) / (2.0 * n) + l2
    momentum = (np.sqrt(lipschitz) - np.sqrt(l2)) / (np.sqrt(lipschitz) + np.sqrt(l2))

    def gradient(a, b):
        g = (softmax(z @ a + b) - targets) / n
        return z.T @ g + l2 * a, g.sum(axis=0) + l2 * b

    a = a_prev = np.zeros((z.shape[1], num_classes))
    b = b_prev = np.zeros(num_classes)
    for _ in range(steps):
        ya, yb = a + momentum * (a - a_prev), b + momentum * (b - b_prev)
        ga, gb = gradient(ya, yb)
        a_prev, b_prev = a, b
        a, b = ya - ga / lipschitz, yb - gb / lipschitz
    return vt[keep].T @ a, b


def linear_probe(support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray, *,
                 l2: float = PROBE_L2, steps: int = PROBE_STEPS) -> np.ndarray:
    """Labels of the query rows from a logistic regression fitted on the support rows.

    Features are standardised with the support set's mean and standard deviation (the only
    labelled data a few-shot learner has; the query set is not looked at), and the penalty is
    l2 / n for n support faces (scikit-learn's C = 1 convention for l2 = 1).
    """
    support_x = np.asarray(support_x, np.float64)
    mean, std = support_x.mean(axis=0), support_x.std(axis=0)
    std = np.where(std > STD_FLOOR, std, 1.0)
    classes, y = np.unique(support_y, return_inverse=True)
    w, b = fit_logistic((support_x - mean) / std, y, len(classes), l2 / len(support_x), steps)
    query = (np.asarray(query_x, np.float64) - mean) / std
    return classes[np.argmax(query @ w + b, axis=-1)]


def usable_classes(labels: np.ndarray, k: int) -> np.ndarray:
    """The classes with at least k + 1 examples: k for the support set, one or more to score."""
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return values[counts >= k + 1]


def few_shot(features: np.ndarray, labels: np.ndarray, k: int, draws: int = DRAWS,
             seed: int = 0) -> dict[str, float]:
    """k-shot compound recognition on fixed features, averaged over random support sets.

    Each draw takes k faces of every usable class at random as the support set; all the other
    faces of those classes are the query set (disjoint from the support). Classes with fewer
    than k + 1 faces are left out of both (they could not be scored); `classes` says how many
    took part, and UAR is the mean recall over them. Draw d orders each class's faces by a
    generator seeded with (seed, d) and takes the first k, so for one seed the k = 1 support is
    part of the k = 5 one, which is part of the k = 10 one.

    Args:
      features: float [N, D], e.g. the network's `features` output.
      labels: int [N] compound classes (0..10).
      k: support faces per class (>= 1).
      draws: number of support sets (>= 1).
      seed: seeds the draws.

    Returns:
      {"classes", "query_count", and for the linear probe ("linear") and the nearest class mean
       ("ncm"): "<m>_uar", "<m>_uar_std", "<m>_accuracy", "<m>_accuracy_std"} (std over draws,
       ddof 0; 0 for one draw).

    Raises:
      ValueError: bad k or draws, mismatched shapes, or fewer than 2 usable classes.
    """
    features, labels = np.asarray(features, np.float64), np.asarray(labels, np.int64)
    if k < 1 or draws < 1:
        raise ValueError(f"few-shot needs k >= 1 and draws >= 1, got k={k}, draws={draws}")
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"features must be [N, D] and labels [N], got {list(features.shape)} "
                         f"and {list(labels.shape)}")
    classes = usable_classes(labels, k)
    if len(classes) < 2:
        raise ValueError(f"{k}-shot needs 2 classes with at least {k + 1} examples; "
                         f"class counts: {dict(zip(*np.unique(labels, return_counts=True)))}")
    scores = {"linear": [], "ncm": []}
    for draw in range(draws):
        rng = np.random.default_rng((seed, draw))
        support = np.zeros(len(labels), bool)
        for c in np.unique(labels):  # every class, usable or not, so orders do not depend on k
            order = rng.permutation(np.flatnonzero(labels == c))
            if c in classes:
                support[order[:k]] = True
        query = np.isin(labels, classes) & ~support
        predictions = {
            "linear": linear_probe(features[support], labels[support], features[query]),
            "ncm": nearest_class_mean(features[support], labels[support], features[query]),
        }
        for method, predicted in predictions.items():
            result = metrics.compound_metrics(labels[query], predicted, np.ones(query.sum()),
                                              NUM_CLASSES)
            scores[method].append((result["uar"], result["accuracy"]))
    out: dict[str, float] = {"classes": float(len(classes)), "query_count": float(query.sum())}
    for method, values in scores.items():
        uar, accuracy = np.array(values).T
        out.update({f"{method}_uar": float(uar.mean()), f"{method}_uar_std": float(uar.std()),
                    f"{method}_accuracy": float(accuracy.mean()),
                    f"{method}_accuracy_std": float(accuracy.std())})
    return out


# --------------------------------------------------------------------------------------------
# Metrics of a split (the compound evaluators of fbnet_jax/eval/evaluators/).

def _labelled(batch: Mapping[str, np.ndarray], source_names: Sequence[str]):
    """(name, rows) of each source with a compound-labelled real example in `batch`."""
    keep = (np.asarray(batch["valid"]) > 0) & (np.asarray(batch["compound_mask"]) > 0)
    source = np.asarray(batch["source"])
    for index, name in enumerate(source_names):
        rows = keep & (source == index)
        if rows.any():
            yield name, rows


def _counts(key: str, y: np.ndarray) -> dict[str, float]:
    return {f"{key}_count": float(len(y)), f"{key}_chance_uar": 1.0 / NUM_CLASSES}


def zero_shot_evaluation(outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
                         source_names: Sequence[str], aus: Sequence[int] = taxonomy.AUS,
                         prefix: str = "test") -> dict[str, float]:
    """Zero-shot compound metrics of each source, as flat keys.

    Only the rows of a source with `valid` 1 and `compound_mask` 1 count; a source without such a
    row has no key (not measured). Keys, with P = f"{prefix}/{source}/compound":

      P_count                               labelled faces
      P_chance_uar                          1/11, the UAR of guessing
      P_zero_shot_{accuracy,uar,macro_f1}   the zero-shot rule (`zero_shot_scores`)
      P_zero_shot_au_uar                    the same rule with only its AU term
      P_zero_shot_expression_uar            the same rule with only its expression term

    Args:
      outputs: "expression_logits" [N, 7] and "au_logits" [N, A].
      batch: the matching "compound", "compound_mask", "source" and "valid" [N].
      source_names: the sources in source-index order.
      aus: the AU numbers of the "au_logits" columns.
      prefix: the split, first component of every key.
    """
    labels = np.asarray(batch["compound"])
    au_term = au_log_likelihood(metrics.sigmoid(outputs["au_logits"]), aus)
    expression_term = expression_log_likelihood(softmax(outputs["expression_logits"]))
    results: dict[str, float] = {}
    for name, rows in _labelled(batch, source_names):
        key, y = f"{prefix}/{name}/compound", labels[rows]
        ones = np.ones(len(y))
        results.update(_counts(key, y))
        zero_shot = AU_WEIGHT * au_term[rows] + EXPRESSION_WEIGHT * expression_term[rows]
        for metric, value in metrics.compound_metrics(y, zero_shot.argmax(-1), ones).items():
            if metric in ("accuracy", "uar", "macro_f1"):
                results[f"{key}_zero_shot_{metric}"] = float(value)
        for term, scores in (("au", au_term[rows]), ("expression", expression_term[rows])):
            results[f"{key}_zero_shot_{term}_uar"] = float(metrics.compound_metrics(
                y, scores.argmax(-1), ones)["uar"])
    return results


def few_shot_evaluation(outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
                        source_names: Sequence[str], prefix: str = "test",
                        ks: Sequence[int] = KS, draws: int = DRAWS,
                        seed: int = 0) -> dict[str, float]:
    """Few-shot compound metrics of each source on the network's features, as flat keys.

    Rows as in `zero_shot_evaluation`. Keys, with P = f"{prefix}/{source}/compound":

      P_count, P_chance_uar                                     as in zero_shot_evaluation
      P_few_shot_k{K}_{uar,uar_std,accuracy,accuracy_std}       the linear probe
      P_few_shot_ncm_k{K}_{uar,uar_std,accuracy,accuracy_std}   the nearest class mean
      P_few_shot_k{K}_classes         classes with at least K + 1 faces (the ones scored)

    Values are means (and standard deviations) over `draws` support sets (`few_shot`); a K at
    which fewer than 2 classes have K + 1 faces has no key.

    Args:
      outputs: "features" [N, D].
      batch, source_names, prefix: as in `zero_shot_evaluation`.
      ks, draws, seed: the few-shot protocol (`few_shot`).
    """
    labels = np.asarray(batch["compound"])
    results: dict[str, float] = {}
    for name, rows in _labelled(batch, source_names):
        key, y = f"{prefix}/{name}/compound", labels[rows]
        results.update(_counts(key, y))
        features = np.asarray(outputs["features"])[rows]
        for k in ks:
            if len(usable_classes(y, k)) < 2:
                continue
            shot = few_shot(features, y, k, draws, seed)
            results[f"{key}_few_shot_k{k}_classes"] = shot["classes"]
            for method, infix in (("linear", ""), ("ncm", "ncm_")):
                for stat in ("uar", "uar_std", "accuracy", "accuracy_std"):
                    results[f"{key}_few_shot_{infix}k{k}_{stat}"] = shot[f"{method}_{stat}"]
    return results


def _zero_shot_lines(results: Mapping[str, float], p: str) -> list[str]:
    """The zero-shot table of one source (key prefix `p`); '-' where a value is not reported."""
    def cell(key, width):
        return f"{results[key]:{width}.4f}" if key in results else f"{'-':>{width}}"
    lines = ["  zero-shot           |  accuracy |      UAR | macro F1"]
    for name, term in (("AU + expression", "zero_shot"), ("AU term only", "zero_shot_au"),
                       ("expression only", "zero_shot_expression")):
        lines.append(f"  {name:<19} | {cell(f'{p}{term}_accuracy', 9)} | "
                     f"{cell(f'{p}{term}_uar', 8)} | {cell(f'{p}{term}_macro_f1', 8)}")
    return lines


def _few_shot_line(results: Mapping[str, float], p: str, k: int) -> str:
    """One row of the few-shot table: classes, then UAR (std) and accuracy of each classifier."""
    if f"{p}few_shot_k{k}_uar" not in results:
        return f"  {k:11d} | fewer than 2 classes with {k + 1} faces"
    cells = [f"{int(results[f'{p}few_shot_k{k}_classes']):7d}"]
    for infix in ("", "ncm_"):
        key = f"{p}few_shot_{infix}k{k}"
        cells += [f"{results[key + '_uar']:.4f} ({results[key + '_uar_std']:.4f})".rjust(16),
                  f"{results[key + '_accuracy']:10.4f}"]
    return f"  {k:11d} | " + " | ".join(cells)


def format_report(results: Mapping[str, float], split: str) -> str:
    """For each source with compound keys of `split`: its count and chance, the zero-shot table
    (when measured), and the few-shot table (one row per k measured or asked for)."""
    suffix = "/compound_count"
    sources = sorted(key[len(split) + 1:-len(suffix)] for key in results
                     if key.startswith(f"{split}/") and key.endswith(suffix))
    lines = []
    for source in sources:
        p = f"{split}/{source}/compound_"
        lines.append(f"{source}: {int(results[p + 'count'])} compound faces, "
                     f"{NUM_CLASSES} classes, chance UAR {results[p + 'chance_uar']:.4f}")
        if p + "zero_shot_uar" in results:
            lines += _zero_shot_lines(results, p)
        ks = sorted({int(m.group(1)) for m in (re.fullmatch(
            re.escape(p) + r"few_shot_(?:ncm_)?k(\d+)_.*", key) for key in results) if m})
        if ks:
            lines.append("  few-shot  k | classes | linear UAR (std) | linear acc |    NCM UAR "
                         "(std) |    NCM acc")
            lines += [_few_shot_line(results, p, k) for k in ks]
    return "\n".join(lines)
