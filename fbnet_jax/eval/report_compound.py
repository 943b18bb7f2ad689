"""The compound-expression section of an evaluation report (fbnet_jax/eval/report.py).

fbnet_jax/eval/compound.py scores RAF-DB's 11 compound classes with a network never trained on them:
zero-shot from its AU and expression probabilities, few-shot (k labelled faces per class) from
its features. Its keys, with P = `{split}/{source}/compound` (docs/paper.md#keys-and-the-command):
P_count, P_chance_uar, P_zero_shot_{accuracy,uar,macro_f1}, P_zero_shot_{au,expression}_uar,
P_few_shot_k{K}_{uar,uar_std,accuracy,accuracy_std,classes} (linear probe) and
P_few_shot_ncm_k{K}_{uar,uar_std,accuracy,accuracy_std} (nearest class mean).

`compound_blocks` turns them into the report's section: for each (split, source) with zero- or
few-shot keys, its faces and chance, a zero-shot table and a few-shot table. `few_shot_plot`
draws UAR against k. The split of these keys may differ from the report's (the compound
evaluation picks its own), so every split in the results is looked at. P_count alone is no
reason for a section: a network with a compound head reports it too (fbnet_jax/eval/metrics.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import matplotlib.style
import numpy as np

from fbnet_jax.core import taxonomy
from fbnet_jax.eval.report_plots import Plot, new_figure, to_png
from fbnet_jax.eval.report_tables import Table

PLOT_NAME = "compound_few_shot"
HEADING = "Compound expressions: zero- and few-shot"

# A zero- or few-shot key: split, source and the metric after "compound_".
_KEY = re.compile(r"^(?P<split>[^/]+)/(?P<source>[^/]+)/compound_"
                  r"(?P<metric>(?:zero|few)_shot_\w+)$")
# A few-shot metric: the nearest class mean ("ncm_") or the linear probe, k and the statistic.
_FEW_SHOT = re.compile(r"^few_shot_(?P<ncm>ncm_)?k(?P<k>[1-9]\d*)_(?P<stat>\w+)$")
# Rows of the zero-shot table: (row name, metric infix); only the full rule has all 3 columns.
ZERO_SHOT_ROWS = (("AU + expression", "zero_shot"), ("AU term only", "zero_shot_au"),
                  ("expression term only", "zero_shot_expression"))
ZERO_SHOT_COLUMNS = (("accuracy", "accuracy"), ("uar", "UAR"), ("macro_f1", "macro F1"))
FEW_SHOT_HEADER = ("k", "classes", "linear UAR", "linear accuracy", "NCM UAR", "NCM accuracy")
# The two few-shot classifiers: (key infix, label of the plot).
METHODS = (("", "linear probe"), ("ncm_", "nearest class mean"))


def compound_subsets(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (split, source) pairs with a zero- or few-shot compound key, sorted."""
    return sorted({(match["split"], match["source"]) for match in map(_KEY.match, results)
                   if match})


def few_shot_ks(results: Mapping[str, Any], split: str, source: str) -> list[int]:
    """The k of the few-shot keys of (split, source), ascending."""
    ks = set()
    for key in results:
        match = _KEY.match(key)
        if match and (match["split"], match["source"]) == (split, source):
            few_shot = _FEW_SHOT.match(match["metric"])
            if few_shot:
                ks.add(int(few_shot["k"]))
    return sorted(ks)


def _value(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def _mean_std(mean: Any, std: Any) -> str:
    """"mean ± std"; the mean alone when the std is absent, '-' when the mean is."""
    if mean is None:
        return "-"
    return f"{float(mean):.4f}" + ("" if std is None else f" ± {float(std):.4f}")


def zero_shot_table(results: Mapping[str, Any], split: str, source: str) -> Table | None:
    """The zero-shot rule and each of its terms alone ('-' where a metric is not reported);
    None when (split, source) has no zero-shot key."""
    p = f"{split}/{source}/compound_"
    rows = [(name, *(_value(results.get(f"{p}{infix}_{metric}"))
                     for metric, _ in ZERO_SHOT_COLUMNS)) for name, infix in ZERO_SHOT_ROWS]
    if all(cell == "-" for row in rows for cell in row[1:]):
        return None
    return Table(("terms", *(header for _, header in ZERO_SHOT_COLUMNS)), tuple(rows))


def few_shot_table(results: Mapping[str, Any], split: str, source: str) -> Table | None:
    """One row per k: classes scored, then UAR (mean ± std over draws) and accuracy of the
    linear probe and of the nearest class mean; None when (split, source) has no few-shot key."""
    ks = few_shot_ks(results, split, source)
    if not ks:
        return None
    p = f"{split}/{source}/compound_few_shot_"
    rows = []
    for k in ks:
        classes = results.get(f"{p}k{k}_classes")
        row = [str(k), "-" if classes is None else str(int(classes))]
        for infix, _ in METHODS:
            key = f"{p}{infix}k{k}"
            row += [_mean_std(results.get(f"{key}_uar"), results.get(f"{key}_uar_std")),
                    _value(results.get(f"{key}_accuracy"))]
        rows.append(tuple(row))
    return Table(FEW_SHOT_HEADER, tuple(rows))


def _summary(results: Mapping[str, Any], split: str, source: str) -> str:
    """The line above the tables: labelled faces, classes and chance UAR."""
    p = f"{split}/{source}/compound_"
    count, chance = results.get(f"{p}count"), results.get(f"{p}chance_uar")
    faces = "-" if count is None else str(int(count))
    return (f"{faces} labelled faces, {len(taxonomy.RAF_COMPOUND_CLASSES)} classes, chance UAR "
            f"{_value(chance)}.")


def few_shot_plot(results: Mapping[str, Any]) -> Plot:
    """UAR against k of the linear probe and the nearest class mean (error bars: std over
    draws), with the zero-shot UAR and chance as horizontal lines; one panel per (split, source)
    with few-shot keys. Not drawn when none has any."""
    title = "Compound expressions: UAR against k"
    subsets = compound_subsets(results)
    ks_of = {subset: few_shot_ks(results, *subset) for subset in subsets}
    panels = [(split, source, ks_of[split, source]) for split, source in subsets
              if ks_of[split, source]]
    if not panels:
        return Plot(PLOT_NAME, title, None, "the results hold no few-shot compound metric")
    with matplotlib.style.context("default"):
        figure = new_figure(PLOT_NAME)
        columns = min(len(panels), 3)
        axes = figure.subplots(math.ceil(len(panels) / columns), columns, squeeze=False)
        for ax, (split, source, ks) in zip(axes.flat, panels):
            _draw_panel(ax, results, split, source, ks)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        png = to_png(figure)
    without = [f"`{source}` ({split})" for (split, source), ks in ks_of.items() if not ks]
    note = ("Means over random support sets of k faces per class, error bars one standard "
            "deviation.")
    if without:
        note += f" No few-shot metric for {', '.join(without)}: no panel."
    return Plot(PLOT_NAME, title, png, note)


def _draw_panel(ax, results: Mapping[str, Any], split: str, source: str, ks: list[int]) -> None:
    """The panel of (split, source) in `few_shot_plot`."""
    p = f"{split}/{source}/compound_"
    # k on a log axis, so 1, 5, 10 (or 1 to 100) spread evenly; the two classifiers sit a few
    # per cent apart so their error bars do not hide each other.
    for (infix, label), shift in zip(METHODS, (0.97, 1.03)):
        points = [(k, results[f"{p}few_shot_{infix}k{k}_uar"],
                   results.get(f"{p}few_shot_{infix}k{k}_uar_std", 0.0)) for k in ks
                  if f"{p}few_shot_{infix}k{k}_uar" in results]
        if points:
            k, uar, std = (np.array(column, np.float64) for column in zip(*points))
            ax.errorbar(k * shift, uar, yerr=std, marker="o", capsize=3, label=label)
    for metric, label, style in (("zero_shot_uar", "zero-shot", "--"),
                                 ("chance_uar", "chance", ":")):
        if f"{p}{metric}" in results:
            value = float(results[f"{p}{metric}"])
            ax.axhline(value, color="0.3", linestyle=style, linewidth=1,
                       label=f"{label} ({value:.3f})")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlim(min(ks) / 1.5, max(ks) * 1.5)
    ax.set_ylim(0, 1)
    ax.set_xlabel("k (labelled faces per class)")
    ax.set_ylabel("UAR")
    ax.set_title(f"{source} ({split})")
    ax.legend(loc="best", fontsize="small")


def compound_blocks(results: Mapping[str, Any], plot: Plot) -> list[Any]:
    """The report's compound section (blocks of fbnet_jax/eval/report.py), [] without compound keys.

    Args:
      results: the evaluation's flat metrics.
      plot: `few_shot_plot(results)`, shown at the end of the section.
    """
    subsets = compound_subsets(results)
    if not subsets:
        return []
    blocks: list[Any] = [("h2", HEADING), ("p", (
        "RAF-DB's 11 compound classes, which the network was never trained on: zero-shot from "
        "its AU and expression probabilities, few-shot from its features with k labelled faces "
        "per class (docs/paper.md#compound-expressions-the-scoring-rule). UAR is the mean "
        "recall over the classes; few-shot values are means ± standard deviations over random "
        "support sets."))]
    for split, source in subsets:
        blocks += [("h3", f"`{source}` ({split})"), ("p", _summary(results, split, source))]
        for heading, table in (("Zero-shot", zero_shot_table(results, split, source)),
                               ("Few-shot", few_shot_table(results, split, source))):
            blocks += [("h4", heading), table if table else
                       ("p", f"The results hold no {heading.lower()} metric.")]
    return blocks + [("h3", plot.title), plot]
