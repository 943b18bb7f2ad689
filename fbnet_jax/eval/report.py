"""Evaluation reports: metric tables and plots, as Markdown and as one self-contained HTML page.

`write_report(results, split, out_dir, arrays=..., workdir=...)` writes `out_dir/report.md`
(Markdown tables, the plots as PNG files beside it, linked) and `out_dir/report.html` (the same
tables, the plots embedded as base64 data URIs, so the page travels alone). `report_for_evaluation`
is the call an evaluation makes once its metrics are written.

Beside the confusion matrix's plot, `out_dir/expression_confusion.json` holds the counts it draws,
for programs (benchmarks/ablation.py reads the prediction histogram from it):
`{"split": ..., "classes": [names], "rows": "true class", "columns": "predicted class",
"counts": [[int]]}`, whole split, `counts[i][j]` the faces of true class i predicted as j.

The plots: the expression confusion matrix normalised per true class, per-AU F1 at threshold 0.5
and at tuned thresholds, predicted against true valence and arousal, the headline metrics per
source, and the run's training curves. A plot whose data is absent (no VA label in the split, no
predictions given, no run directory) is left out and the report says why; nothing is drawn empty.

Results with the zero- and few-shot compound metrics of fbnet_jax/eval/compound.py get one more
section, with their tables and a plot of UAR against k (fbnet_jax/eval/report_compound.py); other
results get no trace of it.

The training curves come from the run's records, `metrics.jsonl` (fbnet_jax/eval/metrics_log.py), not
from its TensorBoard event files, which need the `tensorboard` package (a test extra) or a record
decoder of our own, nor from `train.log`, which is for people (a run from before metrics.jsonl
is read from it, once per report, by metrics_log).

The files are reproducible: matplotlib's default style (whatever the user's matplotlibrc says),
fixed figure sizes and dpi, and no "Software" entry in the PNG metadata (PNGs carry no time
stamp), so the same inputs give the same bytes with the same matplotlib.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.style
import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fbnet_jax.core import logs, taxonomy
from fbnet_jax.eval import metrics, metrics_log

log = logging.getLogger(__name__)

MARKDOWN_FILE, HTML_FILE = "report.md", "report.html"
CONFUSION_FILE = "expression_confusion.json"  # the counts of the confusion matrix plot
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
# Tables.


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


def _per_class(results: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """{class: value} of the keys `{prefix}{class}`."""
    return {key[len(prefix):]: float(v) for key, v in results.items()
            if key.startswith(prefix) and "/" not in key[len(prefix):]}


def _au_order(name: str) -> tuple[float, str]:
    number = name[2:]
    return (int(number) if number.isdigit() else math.inf, name)


def expression_f1_table(results: Mapping[str, Any], split: str) -> Table | None:
    """Per-class expression F1: rows subsets, columns classes (the taxonomy's order first)."""
    per_subset = [(name, _per_class(results, f"{prefix}expression_f1/"))
                  for name, prefix in subsets(results, split)]
    per_subset = [(name, f1) for name, f1 in per_subset if f1]
    if not per_subset:
        return None
    names = {c for _, f1 in per_subset for c in f1}
    classes = [c for c in taxonomy.EXPRESSIONS if c in names] + sorted(
        names - set(taxonomy.EXPRESSIONS))
    return Table(("subset", *classes), tuple(
        (name, *(_cell(f1.get(c), "f1") for c in classes)) for name, f1 in per_subset))


def au_f1_table(results: Mapping[str, Any], split: str) -> Table | None:
    """Per-AU F1 at threshold 0.5: rows AUs, columns subsets ('-' where an AU is unlabelled)."""
    per_subset = [(name, _per_class(results, f"{prefix}au_f1/"))
                  for name, prefix in subsets(results, split)]
    per_subset = [(name, f1) for name, f1 in per_subset if f1]
    if not per_subset:
        return None
    aus = sorted({au for _, f1 in per_subset for au in f1}, key=_au_order)
    return Table(("AU", *(name for name, _ in per_subset)), tuple(
        (au, *(_cell(f1.get(au), "f1") for _, f1 in per_subset)) for au in aus))


def tuned_au_table(results: Mapping[str, Any], split: str) -> Table | None:
    """Per-AU tuned thresholds of the whole split, F1 at them and at 0.5; None when not tuned."""
    tuned = _per_class(results, f"{split}/au_tuned_f1/")
    if not tuned:
        return None
    thresholds = _per_class(results, f"{split}/au_threshold/")
    at_half = _per_class(results, f"{split}/au_f1/")
    return Table(("AU", "threshold", "F1 at threshold", "F1 at 0.5"), tuple(
        (au, _cell(thresholds.get(au), "threshold"), _cell(tuned[au], "f1"),
         _cell(at_half.get(au), "f1")) for au in sorted(tuned, key=_au_order)))


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


def _figure(name: str) -> Figure:
    figure = Figure(figsize=FIGURE_SIZES[name], dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
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
    """The content of `CONFUSION_FILE` for the confusion matrix `counts` (rows true) of `split`."""
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
    figure = _figure("confusion_matrix")
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
    return Plot("confusion_matrix", title, _png(figure),
                f"{int(support.sum())} labelled examples; rows are true classes, each divided "
                f"by its count.")


def _au_plot(results, split) -> Plot:
    title = "F1 per action unit"
    at_half = _per_class(results, f"{split}/au_f1/")
    tuned = _per_class(results, f"{split}/au_tuned_f1/")
    if not at_half and not tuned:
        return Plot("au_f1", title, None, "the results hold no per-AU F1 (no AU label in the "
                    "split)")
    aus = sorted(set(at_half) | set(tuned), key=_au_order)
    series = [(values, label) for values, label in (
        (at_half, f"threshold 0.5 (mean {results.get(f'{split}/au_mean_f1', math.nan):.3f})"),
        (tuned, "tuned thresholds (mean "
                f"{results.get(f'{split}/au_tuned_mean_f1', math.nan):.3f})")) if values]
    width = 0.8 / len(series)
    figure = _figure("au_f1")
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
    return Plot("au_f1", title, _png(figure), "Whole split; an AU nobody labelled has no bar.")


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
    figure = _figure("va_histograms")
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
    return Plot("va_histograms", title, _png(figure),
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
    figure = _figure("sources")
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
    return Plot("sources", title, _png(figure),
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
    figure = _figure("training_curves")
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
    return Plot("training_curves", title, _png(figure), note)


def make_plots(results: Mapping[str, Any], split: str,
               arrays: tuple[Mapping, Mapping] | None, workdir,
               confusion: tuple[np.ndarray | None, str]) -> list[Plot]:
    """Every plot of the report, drawn with matplotlib's default style.

    `confusion` is `confusion_counts(results, split, arrays)`, computed once by the caller, which
    also writes it to `CONFUSION_FILE`: the file holds the very matrix the plot draws.
    """
    with matplotlib.style.context("default"):
        return [_confusion_plot(*confusion, split), _au_plot(results, split),
                _va_plot(results, split, arrays), _sources_plot(results, split),
                _training_plot(workdir)]


# ---------------------------------------------------------------------------------------------
# Rendering.


def _blocks(results, split, plots, compound_plot, title) -> list[Any]:
    """The report as a list of ("h1"|"h2"|"h3"|"h4"|"p", text), Table and Plot."""
    # Here, not at the top: fbnet_jax/eval/report_compound.py imports this module.
    from fbnet_jax.eval import report_compound  # pylint: disable=g-import-not-at-top
    step = results.get("step")
    blocks: list[Any] = [("h1", title), ("p", f"Split `{split}`" + (
        f", checkpoint of step {int(step)}." if step is not None else "."))]
    blocks.append(("h2", "Metrics"))
    blocks.append(("p", "A '-' is a metric not measured: no example of that subset is labelled "
                        "for the task."))
    for heading, task, columns in TASK_TABLES:
        table = task_table(results, split, task, columns)
        if table:
            blocks += [("h3", heading), table]
    for heading, table in (("Expression F1 per class", expression_f1_table(results, split)),
                           ("AU F1 per AU (threshold 0.5)", au_f1_table(results, split)),
                           ("Tuned AU thresholds (whole split)", tuned_au_table(results, split))):
        if table:
            blocks += [("h3", heading), table]
    blocks += report_compound.compound_blocks(results, compound_plot)
    blocks.append(("h2", "Plots"))
    for plot in plots:
        blocks += [("h3", plot.title), plot]
    blocks += [("h2", "All metrics"), all_metrics_table(results)]
    return blocks


_MARKDOWN_PREFIXES = {"h1": "# ", "h2": "## ", "h3": "### ", "h4": "#### ", "p": ""}


def _markdown_cell(text: str) -> str:
    return text.replace("|", r"\|")


def render_markdown(blocks: list[Any]) -> str:
    lines = []
    for block in blocks:
        if isinstance(block, Table):
            lines.append("| " + " | ".join(map(_markdown_cell, block.header)) + " |")
            lines.append("|" + "|".join(["---"] + ["---:"] * (len(block.header) - 1)) + "|")
            lines += ["| " + " | ".join(map(_markdown_cell, row)) + " |" for row in block.rows]
        elif isinstance(block, Plot):
            lines.append(f"![{block.title}]({block.file_name})\n\n{block.note}" if block.png
                         else f"_Not drawn: {block.note}._")
        else:
            kind, text = block
            lines.append(_MARKDOWN_PREFIXES[kind] + text)
        lines.append("")
    return "\n".join(lines)


def _inline(text: str) -> str:
    """HTML of a line of text, `code` spans as <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text, quote=False))


def render_html(blocks: list[Any], title: str) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:0.5em 0 1em}"
             "th,td{border:1px solid #ccc;padding:2px 8px;text-align:right}"
             "th:first-child,td:first-child{text-align:left}img{max-width:100%}</style>",
             "</head><body>"]
    for block in blocks:
        if isinstance(block, Table):
            parts.append("<table><thead><tr>" + "".join(
                f"<th>{_inline(h)}</th>" for h in block.header) + "</tr></thead><tbody>")
            parts += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                      for row in block.rows]
            parts.append("</tbody></table>")
        elif isinstance(block, Plot):
            if block.png:
                data = base64.b64encode(block.png).decode("ascii")
                parts.append(f'<figure><img alt="{html.escape(block.title)}" '
                             f'src="data:image/png;base64,{data}">'
                             f"<figcaption>{_inline(block.note)}</figcaption></figure>")
            else:
                parts.append(f"<p><em>Not drawn: {_inline(block.note)}.</em></p>")
        else:
            kind, text = block
            parts.append(f"<{kind}>{_inline(text)}</{kind}>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(results: Mapping[str, Any], split: str, out_dir: str | Path, *,
                 arrays: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]] | None = None,
                 workdir: str | Path | None = None,
                 title: str | None = None) -> tuple[Path, Path]:
    """Writes `out_dir/report.md` with its PNGs beside it, and the self-contained `report.html`.

    Args:
      results: flat metrics of an evaluation (`evaluate.evaluate`, a `metrics.json`): keys
        `{split}/...` and `{split}/{source}/...`, and optionally "step"; compound zero- and
        few-shot keys (fbnet_jax/eval/compound.py) of any split get a section of their own.
      split: the split of `results` to report.
      out_dir: created if needed. PNGs of plots left out this time are removed from it, so it
        never shows a stale plot; `CONFUSION_FILE` is written with the confusion matrix plot and
        removed without it.
      arrays: (outputs, labels) of the split as `evaluate.predict` returns them; needed for the
        confusion matrix (unless the results carry one) and the VA histograms.
      workdir: the run's directory, for the training curves of its records (metrics.jsonl).
      title: the page title (default: "Evaluation on <split>").

    Returns:
      (Markdown path, HTML path).

    Raises:
      ValueError: `results` holds no metric of `split`.
    """
    if not any(key.startswith(f"{split}/") for key in results):
        found = sorted({key.split("/")[0] for key in results if "/" in key})
        raise ValueError(f"the results hold no metric of split {split!r} (they hold "
                         f"{', '.join(map(repr, found)) or 'none'})")
    title = title or f"Evaluation on {split}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Here, not at the top: fbnet_jax/eval/report_compound.py imports this module.
    from fbnet_jax.eval import report_compound  # pylint: disable=g-import-not-at-top
    confusion = confusion_counts(results, split, arrays)
    plots = make_plots(results, split, arrays, workdir, confusion)
    compound_plot = report_compound.few_shot_plot(results)
    for plot in plots + [compound_plot]:
        path = out_dir / plot.file_name
        if plot.png:
            path.write_bytes(plot.png)
        else:
            path.unlink(missing_ok=True)
    counts, _ = confusion
    if counts is None:
        (out_dir / CONFUSION_FILE).unlink(missing_ok=True)
    else:
        (out_dir / CONFUSION_FILE).write_text(json.dumps(confusion_file(counts, split)) + "\n",
                                              encoding="utf-8")
    blocks = _blocks(results, split, plots, compound_plot, title)
    md_path, html_path = out_dir / MARKDOWN_FILE, out_dir / HTML_FILE
    md_path.write_text(render_markdown(blocks), encoding="utf-8")
    html_path.write_text(render_html(blocks, title), encoding="utf-8")
    return md_path, html_path


def report_for_evaluation(results: Mapping[str, Any], split: str, out_dir: str | Path,
                          outputs: Mapping[str, np.ndarray] | None = None,
                          labels: Mapping[str, np.ndarray] | None = None,
                          workdir: str | Path | None = None) -> tuple[Path, Path] | None:
    """`write_report` for an evaluation that has just written its metrics (call on process 0).

    A report that cannot be written (a full disk, a read-only folder) is logged as a warning and
    the evaluation goes on: its metrics are already safe, and a run must not fail at its very end
    for a secondary file.

    Returns:
      (Markdown path, HTML path), or None when the report could not be written.
    """
    arrays = (outputs, labels) if outputs is not None and labels is not None else None
    try:
        paths = write_report(results, split, out_dir, arrays=arrays, workdir=workdir)
    except OSError as e:
        log.warning("report not written to %s: %s", out_dir, e.strerror or e)
        return None
    log.info("report written to %s", paths[1].absolute())
    return paths
