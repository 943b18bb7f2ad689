"""Evaluation reports: metric tables and plots, as Markdown and as one self-contained HTML page.

`write_report(results, split, out_dir, arrays=..., workdir=...)` writes `out_dir/report.md`
(Markdown tables, the plots as PNG files beside it, linked) and `out_dir/report.html` (the same
tables, the plots embedded as base64 data URIs, so the page travels alone). `report_for_evaluation`
is the call an evaluation makes once its metrics are written.

Beside the confusion matrix's plot, `out_dir/expression_confusion.json` holds the counts it draws,
for programs (benchmarks/ablation.py reads the prediction histogram from it):
`{"split": ..., "classes": [names], "rows": "true class", "columns": "predicted class",
"counts": [[int]]}`, whole split, `counts[i][j]` the faces of true class i predicted as j.

This module orders the report's blocks and renders them; their content comes from
  - fbnet_jax/eval/report_tables.py: the metric tables per subset and task;
  - fbnet_jax/eval/report_plots.py: the plots and the training curves they draw;
  - fbnet_jax/eval/report_compound.py: the section of the zero- and few-shot compound metrics of
    fbnet_jax/eval/compound.py, its tables and its plot of UAR against k (results without those
    metrics get no trace of it).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fbnet_jax.eval import report_compound, report_plots, report_tables

log = logging.getLogger(__name__)

MARKDOWN_FILE, HTML_FILE = "report.md", "report.html"
CONFUSION_FILE = "expression_confusion.json"  # the counts of the confusion matrix plot
# Names of report_tables that fbnet_jax/eval/evaluate.py and fbnet_jax/eval/compare.py read
# from this module.
HEADLINE_METRICS = report_tables.HEADLINE_METRICS
subsets = report_tables.subsets


def _blocks(results, split, plots, compound_plot, title) -> list[Any]:
    """The report as a list of ("h1"|"h2"|"h3"|"h4"|"p", text), Table and Plot."""
    step = results.get("step")
    blocks: list[Any] = [("h1", title), ("p", f"Split `{split}`" + (
        f", checkpoint of step {int(step)}." if step is not None else "."))]
    blocks.append(("h2", "Metrics"))
    blocks.append(("p", "A '-' is a metric not measured: no example of that subset is labelled "
                        "for the task."))
    for heading, task, columns in report_tables.TASK_TABLES:
        table = report_tables.task_table(results, split, task, columns)
        if table:
            blocks += [("h3", heading), table]
    for heading, table in (
            ("Expression F1 per class", report_tables.expression_f1_table(results, split)),
            ("AU F1 per AU (threshold 0.5)", report_tables.au_f1_table(results, split)),
            ("Tuned AU thresholds (whole split)", report_tables.tuned_au_table(results, split))):
        if table:
            blocks += [("h3", heading), table]
    blocks += report_compound.compound_blocks(results, compound_plot)
    blocks.append(("h2", "Plots"))
    for plot in plots:
        blocks += [("h3", plot.title), plot]
    blocks += [("h2", "All metrics"), report_tables.all_metrics_table(results)]
    return blocks


_MARKDOWN_PREFIXES = {"h1": "# ", "h2": "## ", "h3": "### ", "h4": "#### ", "p": ""}


def _markdown_cell(text: str) -> str:
    return text.replace("|", r"\|")


def render_markdown(blocks: list[Any]) -> str:
    lines = []
    for block in blocks:
        if isinstance(block, report_tables.Table):
            lines.append("| " + " | ".join(map(_markdown_cell, block.header)) + " |")
            lines.append("|" + "|".join(["---"] + ["---:"] * (len(block.header) - 1)) + "|")
            lines += ["| " + " | ".join(map(_markdown_cell, row)) + " |" for row in block.rows]
        elif isinstance(block, report_plots.Plot):
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
        if isinstance(block, report_tables.Table):
            parts.append("<table><thead><tr>" + "".join(
                f"<th>{_inline(h)}</th>" for h in block.header) + "</tr></thead><tbody>")
            parts += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                      for row in block.rows]
            parts.append("</tbody></table>")
        elif isinstance(block, report_plots.Plot):
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
    confusion = report_plots.confusion_counts(results, split, arrays)
    plots = report_plots.make_plots(results, split, arrays, workdir, confusion)
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
        (out_dir / CONFUSION_FILE).write_text(
            json.dumps(report_plots.confusion_file(counts, split)) + "\n", encoding="utf-8")
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
