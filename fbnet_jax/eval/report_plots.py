"""The plots of an evaluation report (fbnet_jax/eval/report.py), as PNG bytes.

The plots: the expression confusion matrix normalised per true class, per-AU F1 at threshold 0.5
and at tuned thresholds, predicted against true valence and arousal, the headline metrics per
source, and the run's training curves. A plot whose data is absent (no VA label in the split, no
predictions given, no run directory) is a `Plot` without PNG that says why; nothing is drawn
empty. The compound section's plot is fbnet_jax/eval/report_compound.py's, drawn with
`new_figure` and `to_png` of this module.

The training curves come from the run's records, `metrics.jsonl`
(fbnet_jax/eval/metrics_log.py), not from its TensorBoard event files, which need the
`tensorboard` package (a test extra) or a record decoder of our own, nor from `train.log`, which
is for people (a run from before metrics.jsonl is read from it, once per report, by metrics_log).

The PNGs are reproducible: matplotlib's default style (whatever the user's matplotlibrc says),
fixed figure sizes and dpi, and no "Software" entry in the PNG metadata (PNGs carry no time
stamp), so the same inputs give the same bytes with the same matplotlib.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.style
import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fbnet_jax.core import logs, taxonomy
from fbnet_jax.eval import metrics, metrics_log
from fbnet_jax.eval.report_tables import HEADLINE_METRICS, au_order, per_class, subsets

DPI = 100
# Inches, so pixels are 100x these. Fixed, so reports of different runs line up.
FIGURE_SIZES = {
    "confusion_matrix": (6, 5),
    "au_f1": (9, 5),
    "va_histograms": (10, 5),
    "sources": (9, 5),
    "training_curves": (9, 10),
    "compound_few_shot": (9, 5),
}
VA_BINS = 20  # per axis of the predicted-vs-true histograms over [-1, 1]


@dataclasses.dataclass(frozen=True)
class Plot:
    """A plot of the report: `png` None when it was left out, `note` then says why."""
    name: str
    title: str
    png: bytes | None
    note: str = ""

    @property
    def file_name(self) -> str:
        return f"{self.name}.png"


# ---------------------------------------------------------------------------------------------
# Training curves from the run's records.


def training_curves(records: Sequence[metrics_log.Record]) -> dict[str, dict[int, float]]:
    """The curves of a run's records (`metrics_log.read`): {series: {step: value}}, steps
    ascending.

    Series: "loss/total", "loss/<term>" and "learning_rate" from the logged steps, and
    "<split>/<metric key>" (e.g. "validation/expression_accuracy") of the headline metrics of
    each whole split from the periodic evaluations.
    """
    headline = {key for key, _ in HEADLINE_METRICS}
    curves: dict[str, dict[int, float]] = {}
    for record in records:
        if record.kind == "train":
            names = [n for n in record.values if n.startswith("loss/") or n == "learning_rate"]
        elif record.kind == "eval":
            names = [n for n in record.values
                     if n.count("/") == 1 and n.split("/")[1] in headline]
        else:
            continue
        for name in names:
            curves.setdefault(name, {})[record.step] = record.values[name]
    return {name: dict(sorted(points.items())) for name, points in curves.items()}


# ---------------------------------------------------------------------------------------------
# Plots.


def new_figure(name: str) -> Figure:
    """An empty figure of the size `FIGURE_SIZES[name]`, drawn by Agg."""
    figure = Figure(figsize=FIGURE_SIZES[name], dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def to_png(figure: Figure) -> bytes:
    """The PNG bytes of `figure` at `DPI`."""
    buffer = io.BytesIO()
    # No "Software" entry (matplotlib's version): the bytes depend on the data only.
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _rows(labels: Mapping[str, np.ndarray], mask_key: str) -> np.ndarray:
    """Rows that are real examples (not padding) labelled for the task of `mask_key`."""
    valid = np.asarray(labels["valid"]) > 0 if "valid" in labels else True
    return valid & (np.asarray(labels[mask_key]) > 0)


def confusion_counts(results: Mapping[str, Any], split: str,
                     arrays: tuple[Mapping, Mapping] | None) -> tuple[np.ndarray | None, str]:
    """The expression confusion matrix of the whole split (rows true), or None and why not.

    From `arrays` (outputs, labels) when given, else from a `{split}/expression_confusion_matrix`
    the results carry (e.g. `metrics.confusion_matrices` stored with them).
    """
    if arrays is not None:
        outputs, labels = arrays
        rows = _rows(labels, "expression_mask")
        if not rows.any():
            return None, "no example of the split has an expression label"
        logits = np.asarray(outputs["expression_logits"])
        return metrics.confusion_matrix(labels["expression"], np.argmax(logits, axis=-1), rows,
                                        logits.shape[-1]), ""
    stored = results.get(f"{split}/expression_confusion_matrix")
    if stored is not None:
        return np.asarray(stored, np.int64), ""
    return None, "it needs the predictions of the split, which were not given"


def _class_names(counts: np.ndarray) -> list[str]:
    """The classes of a confusion matrix: the taxonomy's expressions, or indices if it has not 7."""
    n = counts.shape[0]
    return list(taxonomy.EXPRESSIONS) if n == len(taxonomy.EXPRESSIONS) else [
        str(i) for i in range(n)]


def confusion_file(counts: np.ndarray, split: str) -> dict[str, Any]:
    """The content of the report's `CONFUSION_FILE` (fbnet_jax/eval/report.py) for the confusion
    matrix `counts` (rows true) of `split`."""
    return {"split": split, "classes": _class_names(counts), "rows": "true class",
            "columns": "predicted class", "counts": np.asarray(counts, np.int64).tolist()}


def _confusion_plot(counts: np.ndarray | None, why: str, split: str) -> Plot:
    title = "Expression confusion matrix"
    if counts is None:
        return Plot("confusion_matrix", title, None, why)
    support = counts.sum(axis=1)
    # A class without examples gets an empty row, not a row of zeros that reads "all missed".
    normalised = np.full(counts.shape, np.nan)
    np.divide(counts, support[:, None], out=normalised, where=support[:, None] > 0)
    n = counts.shape[0]
    names = _class_names(counts)
    figure = new_figure("confusion_matrix")
    ax = figure.subplots()
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), value in np.ndenumerate(normalised):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if value > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), [f"{name} ({count})" for name, count in zip(names, support)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (examples)")
    ax.set_title(f"{split}: expressions, each row normalised to 1")
    figure.colorbar(image, ax=ax, fraction=0.046)
    return Plot("confusion_matrix", title, to_png(figure),
                f"{int(support.sum())} labelled examples; rows are true classes, each divided "
                f"by its count.")


def _au_plot(results, split) -> Plot:
    title = "F1 per action unit"
    at_half = per_class(results, f"{split}/au_f1/")
    tuned = per_class(results, f"{split}/au_tuned_f1/")
    if not at_half and not tuned:
        return Plot("au_f1", title, None, "the results hold no per-AU F1 (no AU label in the "
                    "split)")
    aus = sorted(set(at_half) | set(tuned), key=au_order)
    series = [(values, label) for values, label in (
        (at_half, f"threshold 0.5 (mean {results.get(f'{split}/au_mean_f1', math.nan):.3f})"),
        (tuned, "tuned thresholds (mean "
                f"{results.get(f'{split}/au_tuned_mean_f1', math.nan):.3f})")) if values]
    width = 0.8 / len(series)
    figure = new_figure("au_f1")
    ax = figure.subplots()
    x = np.arange(len(aus))
    for i, (values, label) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width,
               [values.get(au, math.nan) for au in aus], width, label=label)
    ax.set_xticks(x, aus, rotation=45)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title(f"{split}: F1 per AU")
    ax.legend(loc="upper right")
    return Plot("au_f1", title, to_png(figure), "Whole split; an AU nobody labelled has no bar.")


def _va_plot(results, split, arrays) -> Plot:
    title = "Predicted against true valence and arousal"
    if arrays is None:
        return Plot("va_histograms", title, None,
                    "it needs the predictions of the split, which were not given")
    outputs, labels = arrays
    rows = _rows(labels, "va_mask")
    if not rows.any():
        return Plot("va_histograms", title, None,
                    "no example of the split has valence-arousal labels")
    truth = np.clip(np.asarray(labels["va"], np.float64)[rows], -1, 1)
    predicted = np.clip(np.asarray(outputs["va"], np.float64)[rows], -1, 1)
    figure = new_figure("va_histograms")
    for i, (ax, name) in enumerate(zip(figure.subplots(1, 2), metrics.VA_NAMES)):
        counts, _, _ = np.histogram2d(truth[:, i], predicted[:, i], bins=VA_BINS,
                                      range=((-1, 1), (-1, 1)))
        image = ax.imshow(np.ma.masked_equal(counts.T, 0), origin="lower",
                          extent=(-1, 1, -1, 1), cmap="viridis", interpolation="nearest")
        ax.plot((-1, 1), (-1, 1), color="0.5", linestyle="--", linewidth=1)
        ccc = results.get(f"{split}/va_ccc_{name}")
        ax.set_title(f"{name}" + (f": CCC {ccc:.3f}" if ccc is not None else ""))
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
        figure.colorbar(image, ax=ax, fraction=0.046, label="examples")
    return Plot("va_histograms", title, to_png(figure),
                f"{int(rows.sum())} labelled examples in {VA_BINS}x{VA_BINS} bins; the dashed "
                f"line is a perfect prediction.")


def _sources_plot(results, split) -> Plot:
    title = "Headline metrics per source"
    # A source with no headline metric (only compound ones, say) would be a legend entry without
    # a bar.
    rows = [(name, prefix) for name, prefix in subsets(results, split) if name == "all" or any(
        f"{prefix}{key}" in results for key, _ in HEADLINE_METRICS)]
    if len(rows) < 2:
        return Plot("sources", title, None, "the results hold no per-source metrics")
    columns = [(key, label) for key, label in HEADLINE_METRICS
               if any(f"{prefix}{key}" in results for _, prefix in rows)]
    width = 0.8 / len(rows)
    figure = new_figure("sources")
    ax = figure.subplots()
    x = np.arange(len(columns))
    lowest = 0.0
    for i, (name, prefix) in enumerate(rows):
        values = [float(results.get(f"{prefix}{key}", math.nan)) for key, _ in columns]
        lowest = min([lowest] + [v for v in values if not math.isnan(v)])
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width, label=name,
               color="0.3" if name == "all" else None)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [label for _, label in columns])
    ax.set_ylim(lowest - 0.05 if lowest < 0 else 0, 1)
    ax.set_title(f"{split}: headline metrics per source")
    ax.legend(loc="upper right", fontsize="small", ncols=2)
    return Plot("sources", title, to_png(figure),
                "A source without labels of a task has no bar for its metrics (not measured).")


def _training_plot(workdir) -> Plot:
    title = "Training curves"
    if workdir is None:
        return Plot("training_curves", title, None, "no run directory was given")
    records, path = metrics_log.read(workdir)
    if path is None:
        return Plot("training_curves", title, None,
                    f"{workdir} has no {metrics_log.FILE} (nor a {logs.LOG_FILE})")
    curves = training_curves(records)
    losses = sorted(name for name in curves if name.startswith("loss/"))
    if not losses:
        return Plot("training_curves", title, None,
                    f"{path} has no logged step (a run shorter than train.log_every?)")
    evaluations = sorted(name for name in curves if not name.startswith("loss/")
                         and name != "learning_rate")
    panels = ["losses", "learning_rate"] + (["evaluations"] if evaluations else [])
    figure = new_figure("training_curves")
    axes = dict(zip(panels, figure.subplots(len(panels), 1, sharex=True)))
    for name in ["loss/total"] + [n for n in losses if n != "loss/total"]:
        points = curves[name]
        total = name == "loss/total"
        axes["losses"].plot(list(points), list(points.values()), label=name[5:],
                            color="black" if total else None, linewidth=2 if total else 1)
    axes["losses"].set_ylabel("loss (interval mean)")
    axes["losses"].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    points = curves["learning_rate"]
    axes["learning_rate"].plot(list(points), list(points.values()))
    axes["learning_rate"].set_ylabel("learning rate")
    axes["learning_rate"].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if evaluations:
        for name in evaluations:
            points = curves[name]
            axes["evaluations"].plot(list(points), list(points.values()), marker="o",
                                     label=name)
        axes["evaluations"].set_ylabel("evaluation")
        axes["evaluations"].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    axes[panels[-1]].set_xlabel("step")
    axes[panels[-1]].xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axes["losses"].set_title("training")
    note = f"From {path}." + ("" if evaluations else " No periodic evaluation in the run.")
    return Plot("training_curves", title, to_png(figure), note)


def make_plots(results: Mapping[str, Any], split: str,
               arrays: tuple[Mapping, Mapping] | None, workdir,
               confusion: tuple[np.ndarray | None, str]) -> list[Plot]:
    """The plots of the report's "Plots" section, drawn with matplotlib's default style.

    `confusion` is `confusion_counts(results, split, arrays)`, computed once by the caller, which
    also writes it to the report's `CONFUSION_FILE`: the file holds the very matrix the plot
    draws.
    """
    with matplotlib.style.context("default"):
        return [_confusion_plot(*confusion, split), _au_plot(results, split),
                _va_plot(results, split, arrays), _sources_plot(results, split),
                _training_plot(workdir)]

