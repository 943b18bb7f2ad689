"""Evaluation metrics (exact numpy maths) and the running means of the train log.

Metric functions (docs/design.md#metrics) take whole evaluation sets as numpy arrays and use only
the examples whose mask is 1. Each returns a dict of python numbers (plus the confusion matrix,
an array); `flatten` turns one into the flat `metrics.json` keys, and `evaluate_arrays` computes
every task on a whole set and on each of its sources. A task without any labelled example in a
subset gets no keys for that subset, so a missing key means "not measured", never 0.

Conventions shared with scikit-learn (the tests compare against it): an F1 whose denominator
2·TP + FP + FN is 0 is 0; macro F1 averages over all classes, present or not.

`StepMeans` accumulates per-step scalars (the loss terms) with `clu.metrics.Average` inside or
outside `jax.jit` and turns them into means over a logging interval.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from fbnet_jax.core import taxonomy

DEFAULT_AU_NAMES: tuple[str, ...] = tuple(f"AU{n}" for n in taxonomy.AUS)
VA_NAMES: tuple[str, str] = ("valence", "arousal")

# Weights of the Aff-Wild2 challenge scores (docs/paper.md#metrics-used-in-the-literature).
EXPRESSION_SCORE_F1_WEIGHT = 0.67
EXPRESSION_SCORE_ACCURACY_WEIGHT = 0.33
AU_SCORE_F1_WEIGHT = 0.5
AU_SCORE_ACCURACY_WEIGHT = 0.5

# 0.05, 0.10, ..., 0.95; rounded so that the middle value is exactly 0.5 (linspace gives
# 0.49999999999999994), which keeps chosen thresholds readable in reports.
DEFAULT_THRESHOLD_GRID = np.round(np.linspace(0.05, 0.95, 19), 2)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Elementwise F1 = 2TP / (2TP + FP + FN), 0 where that denominator is 0."""
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, mask: np.ndarray,
                     num_classes: int) -> np.ndarray:
    """int64 [num_classes, num_classes] counts over the masked examples; rows are true classes."""
    keep = np.asarray(mask) > 0
    y = np.asarray(labels)[keep].astype(np.int64)
    p = np.asarray(predictions)[keep].astype(np.int64)
    for name, values in (("labels", y), ("predictions", p)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} outside 0..{num_classes - 1}: {sorted(set(values.tolist()))}")
    return np.bincount(y * num_classes + p, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def _classification(labels: np.ndarray, predictions: np.ndarray, mask: np.ndarray,
                    num_classes: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(confusion matrix, per-class F1, accuracy); raises when no example is labelled."""
    matrix = confusion_matrix(labels, predictions, mask, num_classes)
    count = matrix.sum()
    if count == 0:
        raise ValueError("no labelled example (mask is 0 everywhere)")
    tp = np.diag(matrix)
    f1 = _f1(tp, matrix.sum(axis=0) - tp, matrix.sum(axis=1) - tp)
    return matrix, f1, float(tp.sum() / count)


def expression_metrics(labels: np.ndarray, predictions: np.ndarray, mask: np.ndarray,
                       num_classes: int = len(taxonomy.EXPRESSIONS),
                       class_names: Sequence[str] = taxonomy.EXPRESSIONS) -> dict[str, Any]:
    """Accuracy, macro F1, per-class F1, confusion matrix and the challenge score.

    Args:
      labels: int [N] true classes.
      predictions: int [N] predicted classes (argmax of the logits).
      mask: [N], 1 where the example has an expression label.
      num_classes: number of classes; macro F1 averages over all of them.
      class_names: names of the classes, in order, for the per-class F1.

    Returns:
      {"count", "accuracy", "macro_f1", "score" (0.67·macro F1 + 0.33·accuracy),
       "f1": {class name: F1}, "confusion_matrix": int64 [C, C], rows true}.

    Raises:
      ValueError: no example is labelled, or a labelled class is out of range.
    """
    matrix, f1, accuracy = _classification(labels, predictions, mask, num_classes)
    macro_f1 = float(f1.mean())
    return {
        "count": int(matrix.sum()),
        "accuracy": accuracy,
        "macro_f1": macro_f1,
        "score": EXPRESSION_SCORE_F1_WEIGHT * macro_f1
                 + EXPRESSION_SCORE_ACCURACY_WEIGHT * accuracy,
        "f1": {name: float(value) for name, value in zip(class_names, f1, strict=True)},
        "confusion_matrix": matrix,
    }


def compound_metrics(labels: np.ndarray, predictions: np.ndarray, mask: np.ndarray,
                     num_classes: int = len(taxonomy.RAF_COMPOUND_CLASSES)) -> dict[str, Any]:
    """Accuracy, UAR and macro F1 of compound-expression recognition.

    UAR (unweighted average recall) is the mean recall over the classes present among the labelled
    examples, as in the RAF-DB literature; macro F1 averages over all `num_classes`.

    Returns:
      {"count", "accuracy", "uar", "macro_f1", "confusion_matrix": int64 [C, C], rows true}.

    Raises:
      ValueError: no example is labelled, or a labelled class is out of range.
    """
    matrix, f1, accuracy = _classification(labels, predictions, mask, num_classes)
    support = matrix.sum(axis=1)
    present = support > 0
    return {
        "count": int(matrix.sum()),
        "accuracy": accuracy,
        "uar": float(np.mean(np.diag(matrix)[present] / support[present])),
        "macro_f1": float(f1.mean()),
        "confusion_matrix": matrix,
    }


def _au_counts(labels: np.ndarray, probabilities: np.ndarray, mask: np.ndarray,
               thresholds: float | np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-AU (TP, FP, FN, correct, labelled) over the labelled pairs; active means p >= t."""
    keep = np.asarray(mask) > 0
    truth = np.asarray(labels) > 0.5
    predicted = np.asarray(probabilities) >= np.asarray(thresholds)
    tp = np.sum(keep & predicted & truth, axis=0)
    fp = np.sum(keep & predicted & ~truth, axis=0)
    fn = np.sum(keep & ~predicted & truth, axis=0)
    correct = np.sum(keep & (predicted == truth), axis=0)
    return tp, fp, fn, correct, keep.sum(axis=0)


def au_metrics(labels: np.ndarray, probabilities: np.ndarray, mask: np.ndarray,
               thresholds: float | np.ndarray = 0.5,
               au_names: Sequence[str] = DEFAULT_AU_NAMES) -> dict[str, Any]:
    """Per-AU F1, their mean, accuracy over all labelled (image, AU) pairs, and the score.

    An AU is predicted active when its probability is >= its threshold. The mean F1 runs over the
    AUs with at least one labelled example in this set (a dataset's own AUs), since an AU nobody
    labelled has no F1.

    Args:
      labels: [N, A] in {0, 1}.
      probabilities: [N, A] sigmoid outputs.
      mask: [N, A], 1 where the AU is labelled for that image.
      thresholds: a scalar, or [A] per-AU thresholds (see `choose_au_thresholds`).
      au_names: names of the A columns.

    Returns:
      {"count" (images with >= 1 labelled AU), "label_count" (labelled pairs), "mean_f1",
       "accuracy", "score" (0.5·mean F1 + 0.5·accuracy), "f1": {AU name: F1, labelled AUs only}}.

    Raises:
      ValueError: no AU is labelled.
    """
    tp, fp, fn, correct, labelled = _au_counts(labels, probabilities, mask, thresholds)
    if labelled.sum() == 0:
        raise ValueError("no labelled AU (mask is 0 everywhere)")
    f1 = _f1(tp, fp, fn)
    has_labels = labelled > 0
    mean_f1 = float(f1[has_labels].mean())
    accuracy = float(correct.sum() / labelled.sum())
    return {
        "count": int(np.sum(np.any(np.asarray(mask) > 0, axis=1))),
        "label_count": int(labelled.sum()),
        "mean_f1": mean_f1,
        "accuracy": accuracy,
        "score": AU_SCORE_F1_WEIGHT * mean_f1 + AU_SCORE_ACCURACY_WEIGHT * accuracy,
        "f1": {name: float(value)
               for name, value, ok in zip(au_names, f1, has_labels, strict=True) if ok},
    }


def choose_au_thresholds(labels: np.ndarray, probabilities: np.ndarray, mask: np.ndarray,
                         grid: np.ndarray = DEFAULT_THRESHOLD_GRID) -> np.ndarray:
    """Per-AU thresholds from `grid` that maximise each AU's F1 on a (validation) set.

    Ties go to the grid value nearest 0.5, so an AU whose labels are all negative (F1 0 at every
    threshold) keeps 0.5 instead of drifting to an extreme. An AU with no label gets 0.5.

    Args:
      labels: [N, A] in {0, 1}.
      probabilities: [N, A] sigmoid outputs.
      mask: [N, A], 1 where the AU is labelled for that image.
      grid: candidate thresholds.

    Returns:
      float64 [A].
    """
    grid = np.asarray(grid, np.float64)
    f1 = np.stack([_f1(*_au_counts(labels, probabilities, mask, t)[:3]) for t in grid])  # [G, A]
    is_best = f1 == f1.max(axis=0, keepdims=True)
    distance = np.where(is_best, np.abs(grid - 0.5)[:, None], np.inf)
    chosen = grid[np.argmin(distance, axis=0)]
    labelled = np.sum(np.asarray(mask) > 0, axis=0) > 0
    return np.where(labelled, chosen, 0.5)


def va_metrics(labels: np.ndarray, predictions: np.ndarray, mask: np.ndarray,
               names: Sequence[str] = VA_NAMES) -> dict[str, Any]:
    """CCC (population moments), RMSE and Pearson r per dimension, and the mean CCC.

    A CCC or Pearson r whose denominator is 0 (a constant column, e.g. one labelled example) is
    reported as 0, matching the loss (`losses.ccc`), rather than NaN.

    Args:
      labels: [N, D] targets.
      predictions: [N, D] predictions.
      mask: [N], 1 where the example has a VA label.
      names: names of the D columns.

    Returns:
      {"count", "mean_ccc", and per column n: "ccc_n", "rmse_n", "pearson_n"}.

    Raises:
      ValueError: no example is labelled.
    """
    keep = np.asarray(mask) > 0
    if not keep.any():
        raise ValueError("no labelled VA example (mask is 0 everywhere)")
    y = np.asarray(labels, np.float64)[keep]
    x = np.asarray(predictions, np.float64)[keep]
    dx = x - x.mean(axis=0)
    dy = y - y.mean(axis=0)
    var_x = np.mean(dx * dx, axis=0)
    var_y = np.mean(dy * dy, axis=0)
    cov = np.mean(dx * dy, axis=0)
    ccc_denominator = var_x + var_y + (x.mean(axis=0) - y.mean(axis=0)) ** 2
    ccc = np.where(ccc_denominator > 0, 2 * cov / np.where(ccc_denominator > 0, ccc_denominator, 1),
                   0.0)
    pearson_denominator = np.sqrt(var_x * var_y)
    pearson = np.where(pearson_denominator > 0,
                       cov / np.where(pearson_denominator > 0, pearson_denominator, 1), 0.0)
    rmse = np.sqrt(np.mean((x - y) ** 2, axis=0))
    result: dict[str, Any] = {"count": int(keep.sum()), "mean_ccc": float(ccc.mean())}
    for i, name in enumerate(names):
        result[f"ccc_{name}"] = float(ccc[i])
        result[f"rmse_{name}"] = float(rmse[i])
        result[f"pearson_{name}"] = float(pearson[i])
    return result


def flatten(task_metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Flat `metrics.json` entries of one task's metrics.

    Scalars become f"{prefix}_{key}", per-class mappings f"{prefix}_{key}/{class}"; arrays (the
    confusion matrix) are left out, since they are reports, not scalars (see `confusion_matrices`).
    Example: flatten(expression_metrics(...), "test/expression") gives "test/expression_accuracy",
    "test/expression_f1/Anger", ...
    """
    flat = {}
    for key, value in task_metrics.items():
        if isinstance(value, Mapping):
            flat.update({f"{prefix}_{key}/{name}": float(v) for name, v in value.items()})
        elif np.ndim(value) == 0:
            flat[f"{prefix}_{key}"] = float(value)
    return flat


def _subsets(batch: Mapping[str, np.ndarray], source_names: Sequence[str],
             prefix: str) -> Iterator[tuple[str, np.ndarray]]:
    """(key prefix, boolean row selection): the whole set, then each source; padding excluded."""
    valid = np.asarray(batch["valid"]) > 0
    yield prefix, valid
    source = np.asarray(batch["source"])
    for index, name in enumerate(source_names):
        yield f"{prefix}/{name}", valid & (source == index)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """AU probabilities from AU logits, in float64."""
    # The tanh form never overflows, unlike 1 / (1 + exp(-x)) for large negative x.
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def evaluate_arrays(outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
                    source_names: Sequence[str], aus: Sequence[int] = taxonomy.AUS,
                    prefix: str = "test",
                    au_thresholds: float | np.ndarray = 0.5) -> dict[str, float]:
    """Every metric on a whole evaluation set and on each of its sources, as flat floats.

    Args:
      outputs: model outputs concatenated over the set: "expression_logits" [N, 7],
        "au_logits" [N, A], "va" [N, 2], and optionally "compound_logits" [N, 11].
      batch: the matching labels and masks (`data_pipelines/schema.py`), with "source" (index into
        `source_names`) and "valid" (0 on padding rows, which are left out).
      source_names: the mixture's source names, in source-index order.
      aus: the AU list of the columns of "au_logits"; names the per-AU keys "AU{n}".
      prefix: first component of every key, e.g. "test" or "validation".
      au_thresholds: scalar or [A] thresholds for the AU metrics.

    Returns:
      {f"{prefix}/{task}_{metric}": value} for the whole set and
      {f"{prefix}/{source}/{task}_{metric}": value} per source, tasks being expression, au, va
      and (when "compound_logits" is given) compound, with f"..._count" the number of labelled
      examples. A task with no labelled example in a subset has no key for that subset.
    """
    expression_predictions = np.argmax(outputs["expression_logits"], axis=-1)
    au_probabilities = sigmoid(outputs["au_logits"])
    au_names = tuple(f"AU{n}" for n in aus)
    results: dict[str, float] = {}
    for key, rows in _subsets(batch, source_names, prefix):
        mask = np.asarray(batch["expression_mask"]) * rows
        if mask.any():
            results.update(flatten(expression_metrics(batch["expression"], expression_predictions,
                                                      mask), f"{key}/expression"))
        mask = np.asarray(batch["au_mask"]) * rows[:, None]
        if mask.any():
            results.update(flatten(au_metrics(batch["au"], au_probabilities, mask, au_thresholds,
                                              au_names), f"{key}/au"))
        mask = np.asarray(batch["va_mask"]) * rows
        if mask.any():
            results.update(flatten(va_metrics(batch["va"], outputs["va"], mask), f"{key}/va"))
        if "compound_logits" in outputs:
            mask = np.asarray(batch["compound_mask"]) * rows
            if mask.any():
                compound_logits = np.asarray(outputs["compound_logits"])
                results.update(flatten(compound_metrics(
                    batch["compound"], np.argmax(compound_logits, axis=-1), mask,
                    compound_logits.shape[-1]), f"{key}/compound"))
    return results


def tuned_au_metrics(tune_outputs: Mapping[str, np.ndarray], tune_batch: Mapping[str, np.ndarray],
                     outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
                     aus: Sequence[int] = taxonomy.AUS, prefix: str = "test") -> dict[str, float]:
    """AU metrics of a whole set at per-AU thresholds chosen on another (validation) set.

    The thresholds maximise each AU's F1 on `tune_*` (`choose_au_thresholds`); the metrics of
    `outputs`/`batch` at those thresholds are returned as f"{prefix}/au_tuned_{metric}" (and
    f"{prefix}/au_tuned_f1/AU{n}"), with the thresholds as f"{prefix}/au_threshold/AU{n}".
    Padding rows (valid == 0) of either set are left out. Empty when either set has no AU label.
    """
    def labelled(b):
        return np.asarray(b["au_mask"]) * (np.asarray(b["valid"]) > 0)[:, None]

    tune_mask, mask = labelled(tune_batch), labelled(batch)
    if not (tune_mask.any() and mask.any()):
        return {}
    thresholds = choose_au_thresholds(tune_batch["au"], sigmoid(tune_outputs["au_logits"]),
                                      tune_mask)
    au_names = tuple(f"AU{n}" for n in aus)
    results = flatten(au_metrics(batch["au"], sigmoid(outputs["au_logits"]), mask, thresholds,
                                 au_names), f"{prefix}/au_tuned")
    results.update({f"{prefix}/au_threshold/{name}": float(t)
                    for name, t in zip(au_names, thresholds, strict=True)})
    return results


def tuned_au_metric_names(aus: Sequence[int] = taxonomy.AUS,
                          prefix: str = "test") -> tuple[str, ...]:
    """Every key `tuned_au_metrics` returns for these AUs, sorted (computed by it on a made-up
    set in which every AU is labelled, like `metric_names`)."""
    rows = np.arange(4)
    batch = {"au": (rows[:, None] + np.arange(len(aus))) % 2.0,
             "au_mask": np.ones((4, len(aus))), "valid": np.ones(4)}
    outputs = {"au_logits": np.zeros((4, len(aus)))}
    return tuple(sorted(tuned_au_metrics(outputs, batch, outputs, batch, aus, prefix)))


def confusion_matrices(outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
                       source_names: Sequence[str], prefix: str = "test") -> dict[str, np.ndarray]:
    """The confusion matrices (rows true) that `evaluate_arrays` leaves out, for reports.

    Keys are f"{prefix}/expression" and f"{prefix}/{source}/expression" (and "compound" likewise
    when "compound_logits" is given), only for subsets with a labelled example.
    """
    tasks = {"expression": "expression_logits"}
    if "compound_logits" in outputs:
        tasks["compound"] = "compound_logits"
    matrices = {}
    for key, rows in _subsets(batch, source_names, prefix):
        for task, output in tasks.items():
            mask = np.asarray(batch[f"{task}_mask"]) * rows
            if mask.any():
                logits = np.asarray(outputs[output])
                matrices[f"{key}/{task}"] = confusion_matrix(
                    batch[task], np.argmax(logits, axis=-1), mask, logits.shape[-1])
    return matrices


def metric_names(source_names: Sequence[str], aus: Sequence[int] = taxonomy.AUS,
                 prefix: str = "test") -> tuple[str, ...]:
    """Every key `evaluate_arrays` can return for these sources and AUs, sorted.

    Computed by `evaluate_arrays` itself on a made-up set in which every source labels every
    task, so the names can never drift from the metrics. A real split returns a subset: a task
    nobody in a subset labels has no key there. Used to check a configured metric name
    (`train.best_metric`) before a run starts.
    """
    n, num_aus = len(source_names), len(aus)
    rows = np.arange(2 * n)
    batch = {
        "expression": rows % len(taxonomy.EXPRESSIONS), "expression_mask": np.ones(2 * n),
        "au": (rows[:, None] + np.arange(num_aus)) % 2.0, "au_mask": np.ones((2 * n, num_aus)),
        "va": np.stack([rows, -rows], axis=1) / (2.0 * n), "va_mask": np.ones(2 * n),
        "source": rows % n, "valid": np.ones(2 * n),
    }
    outputs = {"expression_logits": np.zeros((2 * n, len(taxonomy.EXPRESSIONS))),
               "au_logits": np.zeros((2 * n, num_aus)), "va": np.zeros((2 * n, 2))}
    return tuple(sorted(evaluate_arrays(outputs, batch, source_names, aus, prefix)))


@flax.struct.dataclass
class StepMeans:
    """Means of the train step's scalars over a logging interval, from `clu.metrics.Average`.

    The jitted step returns `StepMeans.from_step(values, keep)`; the loop merges them on the
    device (no host transfer per step) and calls `compute` when it logs:

      running = StepMeans.empty()
      for batch in batches:
        state, step_metrics = train_step(state, batch)
        running = running.merge(step_metrics)
      log(running.compute())

    A step whose update was skipped (`keep` False: a non-finite loss or gradient under
    `train.nonfinite = "skip"`) counts in no mean, so one bad step does not turn the interval's
    means into NaN. `skipped` counts those steps and `longest_skip_run` is the longest run of
    consecutive skipped steps; `leading`/`trailing` (the skipped steps at either end) make
    `merge` associative, so runs are counted across merges exactly.
    """
    means: dict[str, clu_metrics.Average]
    steps: jax.Array
    skipped: jax.Array
    leading: jax.Array
    trailing: jax.Array
    longest_skip_run: jax.Array

    @classmethod
    def empty(cls) -> StepMeans:
        zero = jnp.zeros((), jnp.int32)
        return cls(means={}, steps=zero, skipped=zero, leading=zero, trailing=zero,
                   longest_skip_run=zero)

    @classmethod
    def from_step(cls, values: Mapping[str, jax.Array], keep: jax.Array | bool = True) -> StepMeans:
        """One step's scalars (e.g. the loss terms of `losses.task_losses`); `keep` False skips."""
        keep = jnp.reshape(jnp.asarray(keep, bool), (1,))
        skipped = jnp.logical_not(keep[0]).astype(jnp.int32)
        return cls(means={name: clu_metrics.Average.from_model_output(
            jnp.reshape(jnp.asarray(value, jnp.float32), (1,)), mask=keep)
            for name, value in values.items()},
            steps=jnp.ones((), jnp.int32), skipped=skipped, leading=skipped, trailing=skipped,
            longest_skip_run=skipped)

    def merge(self, other: StepMeans) -> StepMeans:
        """`self` followed by `other`; the empty value is the identity. Names must match."""
        if not self.means:
            return other
        if not other.means:
            return self
        if self.means.keys() != other.means.keys():
            raise ValueError(f"cannot merge step metrics {sorted(self.means)} with "
                             f"{sorted(other.means)}")
        self_all, other_all = self.skipped == self.steps, other.skipped == other.steps
        return StepMeans(
            means={name: mean.merge(other.means[name]) for name, mean in self.means.items()},
            steps=self.steps + other.steps, skipped=self.skipped + other.skipped,
            leading=jnp.where(self_all, self.steps + other.leading, self.leading),
            trailing=jnp.where(other_all, other.steps + self.trailing, other.trailing),
            longest_skip_run=jnp.maximum(jnp.maximum(self.longest_skip_run,
                                                     other.longest_skip_run),
                                         self.trailing + other.leading))

    def compute(self) -> dict[str, float]:
        """Means as python floats (a host transfer); {} when nothing was merged. A name whose
        steps were all skipped has no mean (NaN)."""
        if not self.means:
            return {}
        return {name: float(mean.total) / int(mean.count) if int(mean.count) else float("nan")
                for name, mean in self.means.items()}
