"""The tables of an evaluation report (fbnet_jax/eval/report.py): metrics per subset and task.

The results are an evaluation's flat metrics: `{split}/{task}_{metric}` for the whole split,
`{split}/{source}/{task}_{metric}` per source, per-class values under one more `/{class}`. A
subset is the whole split ("all") or one source (`subsets`). A table is text cells, ready to
render; a function whose table would be empty returns None.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fbnet_jax.core import taxonomy

# The headline metrics of a subset (all higher-is-better): (key suffix, label). The columns of
# the console table and summary line of fbnet_jax/eval/evaluate.py, of the per-source plot, of the
# training curves' evaluation panel and of fbnet_jax/eval/compare.py.
HEADLINE_METRICS = (
    ("expression_accuracy", "expr acc"), ("expression_macro_f1", "expr F1"),
    ("au_mean_f1", "AU F1"), ("au_accuracy", "AU acc"),
    ("va_ccc_valence", "CCC V"), ("va_ccc_arousal", "CCC A"), ("va_mean_ccc", "CCC mean"),
)
# One table per task: (heading, task key prefix, ((metric, column header), ...)).
TASK_TABLES = (
    ("Expressions", "expression", (("count", "labelled"), ("accuracy", "accuracy"),
                                   ("macro_f1", "macro F1"), ("score", "score"))),
    ("Action units (threshold 0.5)", "au", (
        ("count", "images"), ("label_count", "labels"), ("mean_f1", "mean F1"),
        ("accuracy", "accuracy"), ("score", "score"))),
    ("Action units (per-AU thresholds tuned on another split)", "au_tuned", (
        ("count", "images"), ("label_count", "labels"), ("mean_f1", "mean F1"),
        ("accuracy", "accuracy"), ("score", "score"))),
    ("Valence and arousal", "va", (
        ("count", "labelled"), ("ccc_valence", "CCC V"), ("ccc_arousal", "CCC A"),
        ("mean_ccc", "mean CCC"), ("rmse_valence", "RMSE V"), ("rmse_arousal", "RMSE A"),
        ("pearson_valence", "r V"), ("pearson_arousal", "r A"))),
    ("Compound expressions", "compound", (("count", "labelled"), ("accuracy", "accuracy"),
                                          ("uar", "UAR"), ("macro_f1", "macro F1"))),
)
TASK_PREFIXES = ("expression_", "au_", "va_", "compound_")


@dataclasses.dataclass(frozen=True)
class Table:
    """A table of the report: a header row and rows of cells, all text."""
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


def subsets(results: Mapping[str, Any], split: str) -> list[tuple[str, str]]:
    """(row name, key prefix): "all" for the whole split, then each source found in `results`.

    A source key is `{split}/{source}/{task}_{metric}[/{class}]`; per-class keys of the whole
    split (`{split}/au_f1/AU1`) have no task prefix in their third part, so are not sources.
    """
    sources = sorted({parts[1] for parts in (key.split("/") for key in results)
                      if len(parts) >= 3 and parts[0] == split
                      and parts[2].startswith(TASK_PREFIXES)})
    return [("all", f"{split}/")] + [(source, f"{split}/{source}/") for source in sources]


def _cell(value: Any, metric: str) -> str:
    if value is None:
        return "-"
    if metric.endswith("count"):
        return str(int(value))
    return f"{float(value):.4f}"


def task_table(results: Mapping[str, Any], split: str, task: str,
               columns: tuple[tuple[str, str], ...]) -> Table | None:
    """One row per subset with a metric of `task`; None when no subset has one.

    A count alone makes no row: the compound evaluation (fbnet_jax/eval/compound.py) reports
    `compound_count` beside metrics of its own, which are not this table's.
    """
    rows = []
    for name, prefix in subsets(results, split):
        values = [results.get(f"{prefix}{task}_{metric}") for metric, _ in columns]
        if any(v is not None for v, (m, _) in zip(values, columns) if not m.endswith("count")):
            rows.append((name, *(_cell(v, m) for v, (m, _) in zip(values, columns))))
    return Table(("subset", *(h for _, h in columns)), tuple(rows)) if rows else None


def per_class(results: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """{class: value} of the keys `{prefix}{class}`."""
    return {key[len(prefix):]: float(v) for key, v in results.items()
            if key.startswith(prefix) and "/" not in key[len(prefix):]}


def au_order(name: str) -> tuple[float, str]:
    """Sort key of an AU name: by number (AU2 before AU12), a name without one last."""
    number = name[2:]
    return (int(number) if number.isdigit() else math.inf, name)


def _f1_per_subset(results: Mapping[str, Any], split: str,
                   metric: str) -> list[tuple[str, dict[str, float]]]:
    """(subset, {class: F1}) for every subset of `split` that has `metric`'s per-class values."""
    per_subset = [(name, per_class(results, f"{prefix}{metric}/"))
                  for name, prefix in subsets(results, split)]
    return [(name, f1) for name, f1 in per_subset if f1]


def expression_f1_table(results: Mapping[str, Any], split: str) -> Table | None:
    """Per-class expression F1: rows subsets, columns classes (the taxonomy's order first)."""
    per_subset = _f1_per_subset(results, split, "expression_f1")
    if not per_subset:
        return None
    names = {c for _, f1 in per_subset for c in f1}
    classes = [c for c in taxonomy.EXPRESSIONS if c in names] + sorted(
        names - set(taxonomy.EXPRESSIONS))
    return Table(("subset", *classes), tuple(
        (name, *(_cell(f1.get(c), "f1") for c in classes)) for name, f1 in per_subset))


def au_f1_table(results: Mapping[str, Any], split: str) -> Table | None:
    """Per-AU F1 at threshold 0.5: rows AUs, columns subsets ('-' where an AU is unlabelled)."""
    per_subset = _f1_per_subset(results, split, "au_f1")
    if not per_subset:
        return None
    aus = sorted({au for _, f1 in per_subset for au in f1}, key=au_order)
    return Table(("AU", *(name for name, _ in per_subset)), tuple(
        (au, *(_cell(f1.get(au), "f1") for _, f1 in per_subset)) for au in aus))


def tuned_au_table(results: Mapping[str, Any], split: str) -> Table | None:
    """Per-AU tuned thresholds of the whole split, F1 at them and at 0.5; None when not tuned."""
    tuned = per_class(results, f"{split}/au_tuned_f1/")
    if not tuned:
        return None
    thresholds = per_class(results, f"{split}/au_threshold/")
    at_half = per_class(results, f"{split}/au_f1/")
    return Table(("AU", "threshold", "F1 at threshold", "F1 at 0.5"), tuple(
        (au, _cell(thresholds.get(au), "threshold"), _cell(tuned[au], "f1"),
         _cell(at_half.get(au), "f1")) for au in sorted(tuned, key=au_order)))


def all_metrics_table(results: Mapping[str, Any]) -> Table:
    """Every scalar of `results` at full precision (repr), sorted by key."""
    rows = []
    for key in sorted(results):
        value = results[key]
        if np.ndim(value) != 0:
            continue  # a confusion matrix carried along: drawn, not listed
        value = float(value)
        text = str(int(value)) if (key.endswith("count") or key == "step") and \
            value.is_integer() else repr(value)
        rows.append((f"`{key}`", text))
    return Table(("metric", "value"), tuple(rows))
