"""Evaluation reports (fbnet_jax/eval/report.py) and run comparison (fbnet_jax/eval/compare.py)."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import shutil

import numpy as np
import pytest
from conftest import load_config
from PIL import Image

from fbnet_jax.runtime import checkpointing, parallel
from fbnet_jax.eval import compare, evaluate, metrics_log, report
from fbnet_jax.eval import report_compound, report_plots, report_tables
from fbnet_jax.core import taxonomy
from fbnet_jax.train import loop as train
from fbnet_jax.runtime import state as state_lib
from fbnet_jax.core.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pixel sizes (width, height) of the plots: fixed figure sizes at 100 dpi.
PNG_SIZES = {"confusion_matrix.png": (600, 500), "au_f1.png": (900, 500),
             "va_histograms.png": (1000, 500), "sources.png": (900, 500),
             "training_curves.png": (900, 1000)}
# Drawn only for results with zero- or few-shot compound metrics.
COMPOUND_PNG_SIZES = {"compound_few_shot.png": (900, 500)}

# Flat metrics as an evaluation writes them: source "a" labels expressions, "b" AUs (AU1 only)
# and VA; AU thresholds were tuned.
RESULTS = {
    "step": 120.0,
    "test/expression_count": 8.0, "test/expression_accuracy": 0.625,
    "test/expression_macro_f1": 0.5, "test/expression_score": 0.55,
    "test/expression_f1/Happiness": 1.0, "test/expression_f1/Neutral": 0.5,
    "test/a/expression_count": 8.0, "test/a/expression_accuracy": 0.625,
    "test/a/expression_macro_f1": 0.5, "test/a/expression_score": 0.55,
    "test/a/expression_f1/Happiness": 1.0, "test/a/expression_f1/Neutral": 0.5,
    "test/au_count": 6.0, "test/au_label_count": 10.0, "test/au_mean_f1": 0.75,
    "test/au_accuracy": 0.8, "test/au_score": 0.775,
    "test/au_f1/AU1": 0.5, "test/au_f1/AU12": 1.0,
    "test/b/au_count": 6.0, "test/b/au_label_count": 6.0, "test/b/au_mean_f1": 0.5,
    "test/b/au_accuracy": 0.5, "test/b/au_score": 0.5, "test/b/au_f1/AU1": 0.5,
    "test/au_tuned_count": 6.0, "test/au_tuned_label_count": 10.0, "test/au_tuned_mean_f1": 0.9,
    "test/au_tuned_accuracy": 0.9, "test/au_tuned_score": 0.9,
    "test/au_tuned_f1/AU1": 0.8, "test/au_tuned_f1/AU12": 1.0,
    "test/au_threshold/AU1": 0.35, "test/au_threshold/AU12": 0.5,
    "test/va_count": 4.0, "test/va_ccc_valence": 0.1 + 0.2, "test/va_ccc_arousal": -0.125,
    "test/va_mean_ccc": 0.0625,
    "test/b/va_count": 4.0, "test/b/va_ccc_valence": 0.25, "test/b/va_ccc_arousal": -0.125,
    "test/b/va_mean_ccc": 0.0625,
}

# The keys of fbnet_jax/eval/compound.py's zero- and few-shot evaluations for source "c" of the
# test split, which labels nothing else: zero-shot and few-shot at k = 1 and 5 (k = 5 listed
# first).
C = "test/c/compound"
COMPOUND = {
    f"{C}_count": 48.0, f"{C}_chance_uar": 1 / 11,
    f"{C}_zero_shot_accuracy": 0.3125, f"{C}_zero_shot_uar": 0.28125,
    f"{C}_zero_shot_macro_f1": 0.25, f"{C}_zero_shot_au_uar": 0.1875,
    f"{C}_zero_shot_expression_uar": 0.21875,
    f"{C}_few_shot_k5_classes": 9.0,
    f"{C}_few_shot_k5_uar": 0.5, f"{C}_few_shot_k5_uar_std": 0.0625,
    f"{C}_few_shot_k5_accuracy": 0.53125, f"{C}_few_shot_k5_accuracy_std": 0.03125,
    f"{C}_few_shot_ncm_k5_uar": 0.4375, f"{C}_few_shot_ncm_k5_uar_std": 0.046875,
    f"{C}_few_shot_ncm_k5_accuracy": 0.46875, f"{C}_few_shot_ncm_k5_accuracy_std": 0.015625,
    f"{C}_few_shot_k1_classes": 11.0,
    f"{C}_few_shot_k1_uar": 0.25, f"{C}_few_shot_k1_uar_std": 0.125,
    f"{C}_few_shot_k1_accuracy": 0.2578125, f"{C}_few_shot_k1_accuracy_std": 0.1,
    f"{C}_few_shot_ncm_k1_uar": 0.234375, f"{C}_few_shot_ncm_k1_uar_std": 0.09375,
    f"{C}_few_shot_ncm_k1_accuracy": 0.2421875, f"{C}_few_shot_ncm_k1_accuracy_std": 0.05,
}
# Zero-shot keys only, of another split than the report's.
COMPOUND_VALIDATION = {
    "validation/d/compound_count": 20.0, "validation/d/compound_chance_uar": 1 / 11,
    "validation/d/compound_zero_shot_accuracy": 0.35, "validation/d/compound_zero_shot_uar": 0.3,
    "validation/d/compound_zero_shot_macro_f1": 0.2,
    "validation/d/compound_zero_shot_au_uar": 0.15,
    "validation/d/compound_zero_shot_expression_uar": 0.25,
}

TRAIN_LOG = """\
2026-01-01 10:00:00 work directory: /runs/x
2026-01-01 10:00:01 devices: 1 x cpu over 1 process(es)
2026-01-01 10:00:02 no checkpoint in /runs/x: starting at step 0
2026-01-01 10:00:05 step  50/200 ( 25%) | 5.00 steps/s 320 ex/s | ETA 0m30s | loss 3.5000 | \
au 0.7000 expression 1.9000 va 0.9000 | lr 1.00e-03
2026-01-01 10:00:06 validation: expr acc 0.2500, expr F1 0.1250, AU F1 0.3000, AU acc 0.7000, \
CCC V 0.1000, CCC A -0.0500, CCC mean 0.0250
2026-01-01 10:00:07 WARNING: skipped 1 of the steps 51-100: non-finite loss or gradient \
(train.nonfinite = 'skip')
2026-01-01 10:00:10 step 100/200 ( 50%) | 5.00 steps/s 320 ex/s | ETA 0m20s | loss 3.0000 | \
au 0.6000 expression 1.6000 va 0.8000 | lr 8.00e-04
2026-01-01 10:00:15 step 150/200 ( 75%) | 5.00 steps/s 320 ex/s | ETA 0m10s | loss 2.8000 | \
au 0.6000 expression 1.4000 va 0.8000 | lr 5.00e-04
2026-01-01 11:00:00 work directory: /runs/x
2026-01-01 11:00:01 resumed from the checkpoint of step 50
2026-01-01 11:00:10 step 100/200 ( 50%) | 4.00 steps/s 256 ex/s | ETA 0m25s | loss 2.9000 | \
au 0.6000 expression 1.5000 va 0.8000 | lr 8.00e-04
2026-01-01 11:00:11 validation: expr acc 0.3750, expr F1 0.2500
2026-01-01 11:00:20 step 200/200 (100%) | 4.00 steps/s 256 ex/s | ETA 0m00s | loss 2.5000 | \
au 0.5000 expression 1.2000 va 0.8000 | lr 4.00e-05
2026-01-01 11:00:21 final evaluation on 'test' (step 200):
source   | expr acc |  expr F1
all      |   0.1456 |   0.0363
2026-01-01 11:00:22 finished; metrics written to /runs/x/metrics.json
"""
TRAIN_CURVES = {
    "loss/total": {50: 3.5, 100: 2.9, 200: 2.5},
    "loss/au": {50: 0.7, 100: 0.6, 200: 0.5},
    "loss/expression": {50: 1.9, 100: 1.5, 200: 1.2},
    "loss/va": {50: 0.9, 100: 0.8, 200: 0.8},
    "learning_rate": {50: 1e-3, 100: 8e-4, 200: 4e-5},
    "validation/expression_accuracy": {50: 0.25, 100: 0.375},
    "validation/expression_macro_f1": {50: 0.125, 100: 0.25},
    "validation/au_mean_f1": {50: 0.3},
    "validation/au_accuracy": {50: 0.7},
    "validation/va_ccc_valence": {50: 0.1},
    "validation/va_ccc_arousal": {50: -0.05},
    "validation/va_mean_ccc": {50: 0.025},
}


def _arrays(va_labelled: bool = True):
    """(outputs, labels) of 10 rows, the last two padding; row 6 has no expression label."""
    n, num_aus = 10, len(taxonomy.AUS)
    expression = np.array([0, 0, 4, 4, 4, 5, 1, 2, 3, 3])
    predicted = np.array([0, 4, 4, 4, 0, 5, 2, 2, 3, 3])
    va = np.linspace(-0.9, 0.9, 2 * n).reshape(n, 2)
    outputs = {"expression_logits": np.eye(7)[predicted] * 3.0,
               "au_logits": np.linspace(-2, 2, n * num_aus).reshape(n, num_aus),
               "va": va[::-1] * 0.5}
    labels = {"expression": expression,
              "expression_mask": np.array([1, 1, 1, 1, 1, 1, 0, 1, 1, 1.0]),
              "au": (np.arange(n * num_aus).reshape(n, num_aus) % 3 == 0).astype(np.float32),
              "au_mask": np.ones((n, num_aus)), "va": va,
              "va_mask": np.full(n, 1.0 if va_labelled else 0.0),
              "source": np.array([0, 0, 0, 0, 0, 1, 1, 1, 0, 0]),
              "valid": np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0.0])}
    return outputs, labels


def _workdir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text(TRAIN_LOG)
    return run


def _section(markdown: str, heading: str) -> str:
    """The text under `### heading` up to the next heading."""
    return markdown.split(f"### {heading}\n", 1)[1].split("\n#", 1)[0]


def _embedded_pngs(html_text: str) -> list[bytes]:
    return [base64.b64decode(data) for data in
            re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text)]


def _check_pngs(out, names, html_path):
    """Each named PNG is in `out` with its size and embedded in the HTML, no other PNG is."""
    sizes = {**PNG_SIZES, **COMPOUND_PNG_SIZES}
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)
    embedded = _embedded_pngs(html_path.read_text())
    files = [(out / name).read_bytes() for name in names]
    assert sorted(embedded) == sorted(files)
    for name, data in zip(names, files):
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == sizes[name], name


def test_report_files_tables_and_embedded_plots(tmp_path):
    out = tmp_path / "report"
    md_path, html_path = report.write_report(RESULTS, "test", out, arrays=_arrays(),
                                             workdir=_workdir(tmp_path), title="Run x")
    assert (md_path, html_path) == (out / "report.md", out / "report.html")
    _check_pngs(out, list(PNG_SIZES), html_path)
    markdown = md_path.read_text()
    for name in PNG_SIZES:
        assert f"]({name})" in markdown
    assert "Not drawn" not in markdown
    assert markdown.startswith("# Run x\n\nSplit `test`, checkpoint of step 120.\n")
    assert _section(markdown, "Expressions").strip().splitlines() == [
        "| subset | labelled | accuracy | macro F1 | score |", "|---|---:|---:|---:|---:|",
        "| all | 8 | 0.6250 | 0.5000 | 0.5500 |", "| a | 8 | 0.6250 | 0.5000 | 0.5500 |"]
    assert _section(markdown, "Action units (threshold 0.5)").strip().splitlines()[2:] == [
        "| all | 6 | 10 | 0.7500 | 0.8000 | 0.7750 |", "| b | 6 | 6 | 0.5000 | 0.5000 | 0.5000 |"]
    assert _section(markdown, "Valence and arousal").strip().splitlines()[2:] == [
        "| all | 4 | 0.3000 | -0.1250 | 0.0625 | - | - | - | - |",
        "| b | 4 | 0.2500 | -0.1250 | 0.0625 | - | - | - | - |"]
    assert _section(markdown, "Expression F1 per class").strip().splitlines() == [
        "| subset | Neutral | Happiness |", "|---|---:|---:|",
        "| all | 0.5000 | 1.0000 |", "| a | 0.5000 | 1.0000 |"]
    assert _section(markdown, "AU F1 per AU (threshold 0.5)").strip().splitlines()[2:] == [
        "| AU1 | 0.5000 | 0.5000 |", "| AU12 | 1.0000 | - |"]
    assert _section(markdown, "Tuned AU thresholds (whole split)").strip().splitlines()[2:] == [
        "| AU1 | 0.3500 | 0.8000 | 0.5000 |", "| AU12 | 0.5000 | 1.0000 | 1.0000 |"]
    all_metrics = markdown.split("## All metrics\n", 1)[1]
    for line in ("| `step` | 120 |", "| `test/expression_accuracy` | 0.625 |",
                 "| `test/au_label_count` | 10 |",
                 "| `test/va_ccc_valence` | 0.30000000000000004 |"):
        assert line in all_metrics
    assert len(re.findall(r"^\| `", all_metrics, re.M)) == len(RESULTS)
    assert "Compound expressions" not in markdown
    # The HTML holds the same tables.
    html_text = html_path.read_text()
    assert "<tr><td>b</td><td>6</td><td>6</td><td>0.5000</td>" in html_text
    assert "<td><code>test/va_ccc_valence</code></td><td>0.30000000000000004</td>" in html_text


def test_plots_without_data_are_left_out_with_a_reason(tmp_path):
    out = tmp_path / "report"
    report.write_report(RESULTS, "test", out, arrays=_arrays(), workdir=_workdir(tmp_path))
    # Again without VA labels, AU results, per-source keys or a run: those plots are not drawn,
    # and their PNGs from the first report are gone.
    results = {k: v for k, v in RESULTS.items() if "/au" not in k and k.count("/") < 2}
    results["test/expression_f1/Neutral"] = 0.5
    md_path, html_path = report.write_report(results, "test", out,
                                             arrays=_arrays(va_labelled=False))
    _check_pngs(out, ["confusion_matrix.png"], html_path)
    markdown = md_path.read_text()
    for heading, why in (
            ("F1 per action unit", "the results hold no per-AU F1 (no AU label in the split)"),
            ("Predicted against true valence and arousal",
             "no example of the split has valence-arousal labels"),
            ("Headline metrics per source", "the results hold no per-source metrics"),
            ("Training curves", "no run directory was given")):
        assert _section(markdown, heading).strip() == f"_Not drawn: {why}._"
        assert f"<em>Not drawn: {why}.</em>" in html_path.read_text()
    # Without predictions: no confusion matrix (nor its counts) and no VA plot; a run without
    # records.
    assert (out / report.CONFUSION_FILE).is_file()
    md_path, html_path = report.write_report(results, "test", out, workdir=tmp_path)
    _check_pngs(out, [], html_path)
    assert not (out / report.CONFUSION_FILE).exists()
    markdown = md_path.read_text()
    assert _section(markdown, "Expression confusion matrix").strip() == (
        "_Not drawn: it needs the predictions of the split, which were not given._")
    assert f"_Not drawn: {tmp_path} has no metrics.jsonl (nor a train.log)._" in markdown


def test_confusion_counts_use_the_labelled_real_rows(tmp_path):
    counts, why = report_plots.confusion_counts({}, "test", _arrays())
    expected = np.zeros((7, 7), np.int64)
    # Rows 0-5 and 7 (row 6 is unlabelled, rows 8-9 are padding): true -> predicted.
    for true, predicted in ((0, 0), (0, 4), (4, 4), (4, 4), (4, 0), (5, 5), (2, 2)):
        expected[true, predicted] += 1
    np.testing.assert_array_equal(counts, expected)
    assert why == ""
    # Without predictions, a matrix carried by the results is used.
    carried = {"test/expression_confusion_matrix": expected.tolist()}
    np.testing.assert_array_equal(report_plots.confusion_counts(carried, "test", None)[0], expected)


def test_confusion_counts_are_written_beside_the_plot(tmp_path):
    out = tmp_path / "report"
    report.write_report(RESULTS, "test", out, arrays=_arrays())
    assert (out / "confusion_matrix.png").is_file()
    # The counts of test_confusion_counts_use_the_labelled_real_rows, whole split.
    assert json.loads((out / report.CONFUSION_FILE).read_text()) == {
        "split": "test", "classes": list(taxonomy.EXPRESSIONS), "rows": "true class",
        "columns": "predicted class",
        "counts": [[1, 0, 0, 0, 1, 0, 0],
                   [0, 0, 0, 0, 0, 0, 0],
                   [0, 0, 1, 0, 0, 0, 0],
                   [0, 0, 0, 0, 0, 0, 0],
                   [1, 0, 0, 0, 2, 0, 0],
                   [0, 0, 0, 0, 0, 1, 0],
                   [0, 0, 0, 0, 0, 0, 0]]}
    # A matrix the results carry (no predictions given) is written as well; this one is not
    # symmetric, so rows and columns cannot be swapped unseen.
    carried = [[7 * true + predicted for predicted in range(7)] for true in range(7)]
    report.write_report({**RESULTS, "test/expression_confusion_matrix": carried}, "test", out)
    assert json.loads((out / report.CONFUSION_FILE).read_text())["counts"] == carried


def test_reports_are_reproducible(tmp_path):
    workdir = _workdir(tmp_path)
    first = report.write_report(RESULTS, "test", tmp_path / "a", arrays=_arrays(),
                                workdir=workdir)
    second = report.write_report(RESULTS, "test", tmp_path / "b", arrays=_arrays(),
                                 workdir=workdir)
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
    for name in PNG_SIZES:
        data = (tmp_path / "a" / name).read_bytes()
        assert data == (tmp_path / "b" / name).read_bytes()
        assert b"Software" not in data and b"Matplotlib" not in data


def test_compound_section_tables_and_plot(tmp_path):
    results = {**RESULTS, **COMPOUND, **COMPOUND_VALIDATION}
    workdir = _workdir(tmp_path)
    md_path, html_path = report.write_report(results, "test", tmp_path / "with",
                                             arrays=_arrays(), workdir=workdir)
    _check_pngs(tmp_path / "with", [*PNG_SIZES, *COMPOUND_PNG_SIZES], html_path)
    markdown = md_path.read_text()
    section = markdown.split(f"## {report_compound.HEADING}\n", 1)[1].split("\n## ", 1)[0]
    assert _section(section, "`c` (test)").strip() == (
        "48 labelled faces, 11 classes, chance UAR 0.0909.")
    assert section.split("#### Zero-shot\n", 1)[1].split("\n#", 1)[0].strip().splitlines() == [
        "| terms | accuracy | UAR | macro F1 |", "|---|---:|---:|---:|",
        "| AU + expression | 0.3125 | 0.2812 | 0.2500 |",
        "| AU term only | - | 0.1875 | - |",
        "| expression term only | - | 0.2188 | - |"]
    assert section.split("#### Few-shot\n", 1)[1].split("\n#", 1)[0].strip().splitlines() == [
        "| k | classes | linear UAR | linear accuracy | NCM UAR | NCM accuracy |",
        "|---|---:|---:|---:|---:|---:|",
        "| 1 | 11 | 0.2500 ± 0.1250 | 0.2578 | 0.2344 ± 0.0938 | 0.2422 |",
        "| 5 | 9 | 0.5000 ± 0.0625 | 0.5312 | 0.4375 ± 0.0469 | 0.4688 |"]
    # Another split's source with zero-shot keys only: its tables, no few-shot, no panel.
    other = section.split("### `d` (validation)\n", 1)[1].split("\n### ", 1)[0]
    assert "| AU + expression | 0.3500 | 0.3000 | 0.2000 |" in other
    assert "#### Few-shot\n\nThe results hold no few-shot metric." in other
    assert _section(section, "Compound expressions: UAR against k").strip().splitlines() == [
        "![Compound expressions: UAR against k](compound_few_shot.png)", "",
        "Means over random support sets of k faces per class, error bars one standard "
        "deviation. No few-shot metric for `d` (validation): no panel."]
    assert "<h4>Few-shot</h4>" in html_path.read_text()
    assert markdown.index(f"## {report_compound.HEADING}") > markdown.index("### Tuned AU")
    assert markdown.index(f"## {report_compound.HEADING}") < markdown.index("## Plots")
    # Source "c" labels compounds only: no row in the task tables, no bar in the per-source
    # plot (the same bytes as without it), and no compound-head table from its count.
    md_without, _ = report.write_report(RESULTS, "test", tmp_path / "without",
                                        arrays=_arrays(), workdir=workdir)
    assert markdown.split("## Compound")[0] == md_without.read_text().split("## Plots")[0]
    assert "### Compound expressions\n" not in markdown
    assert (tmp_path / "with" / "sources.png").read_bytes() == (
        tmp_path / "without" / "sources.png").read_bytes()
    all_metrics = markdown.split("## All metrics\n", 1)[1]
    assert len(re.findall(r"^\| `", all_metrics, re.M)) == len(results)
    assert "| `test/c/compound_few_shot_k1_uar` | 0.25 |" in all_metrics
    # The plot is reproducible.
    assert report_compound.few_shot_plot(results).png == (
        tmp_path / "with" / "compound_few_shot.png").read_bytes()


def test_without_compound_keys_no_section_and_a_stale_plot_is_removed(tmp_path):
    out = tmp_path / "report"
    report.write_report({**RESULTS, **COMPOUND}, "test", out)
    assert (out / "compound_few_shot.png").is_file()
    md_path, html_path = report.write_report(RESULTS, "test", out)
    assert not (out / "compound_few_shot.png").exists()
    _check_pngs(out, ["au_f1.png", "sources.png"], html_path)
    for text in (md_path.read_text(), html_path.read_text()):
        assert "Compound expressions" not in text and "compound_few_shot" not in text
    # Zero-shot keys only: the section, but no plot (and no PNG).
    md_path, _ = report.write_report({**RESULTS, **COMPOUND_VALIDATION}, "test", out)
    assert not (out / "compound_few_shot.png").exists()
    assert _section(md_path.read_text(), "Compound expressions: UAR against k").strip() == (
        "_Not drawn: the results hold no few-shot compound metric._")


def test_compound_head_table_and_few_shot_ks():
    # A compound head's metrics (fbnet_jax/eval/metrics.py) still get their task table row; a count
    # alone (the compound evaluation's) does not.
    columns = report_tables.TASK_TABLES[-1][2]
    head = {"test/c/compound_count": 4.0, "test/c/compound_uar": 0.5}
    assert report_tables.task_table(head, "test", "compound", columns) == report_tables.Table(
        ("subset", "labelled", "accuracy", "UAR", "macro F1"), (("c", "4", "-", "0.5000", "-"),))
    assert report_tables.task_table({"test/c/compound_count": 4.0}, "test", "compound",
                                    columns) is None
    # k sorted as numbers, from the linear probe's or the NCM's keys.
    ks = {f"{C}_few_shot_k10_uar": 0.5, f"{C}_few_shot_ncm_k2_uar": 0.5, f"{C}_count": 3.0,
          "test/e/compound_few_shot_k3_uar": 0.5}
    assert report_compound.few_shot_ks(ks, "test", "c") == [2, 10]
    assert report_compound.compound_subsets(ks) == [("test", "c"), ("test", "e")]


def test_report_needs_metrics_of_the_split(tmp_path):
    with pytest.raises(ValueError, match=r"no metric of split 'validation' \(they hold 'test'\)"):
        report.write_report(RESULTS, "validation", tmp_path)


def test_training_curves_from_a_train_log_of_a_run_before_metrics_jsonl(tmp_path, caplog):
    run = _workdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="fbnet_jax.eval.metrics_log"):
        records, path = metrics_log.read(run)
    assert path == run / "train.log"
    assert f"{run} has no metrics.jsonl (a run from before it): reading its records from " \
           f"{path}" in caplog.text
    # The first invocation's records of steps 100 and 150 are dropped: the restart from step 50
    # did those steps again.
    assert [(r.kind, r.step) for r in records] == [
        ("start", 0), ("train", 50), ("eval", 50), ("start", 50), ("train", 100),
        ("eval", 100), ("train", 200)]
    assert records[1].values == {
        "loss/total": 3.5, "loss/au": 0.7, "loss/expression": 1.9, "loss/va": 0.9,
        "learning_rate": 1e-3, "steps_per_second": 5.0, "examples_per_second": 320.0}
    assert report_plots.training_curves(records) == TRAIN_CURVES


# --- Comparison of runs -------------------------------------------------------------------------


def _run_dir(path, metrics=None, evals=None):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    for name, values in (evals or {}).items():
        (path / "eval").mkdir(exist_ok=True)
        (path / "eval" / name).write_text(json.dumps(values))
    return path


def test_compare_marks_the_best_and_the_differences(tmp_path, caplog):
    a = _run_dir(tmp_path / "x" / "seed0", {"step": 10.0, "test/expression_accuracy": 0.5,
                                            "test/au_mean_f1": 0.25})
    b = _run_dir(tmp_path / "y" / "seed0", {"step": 20.0, "test/expression_accuracy": 0.75,
                                            "test/au_mean_f1": 0.25, "test/va_mean_ccc": 0.1,
                                            "test/b/va_mean_ccc": 0.2})
    out = tmp_path / "out" / "compare.md"
    with caplog.at_level(logging.INFO, logger="fbnet_jax.eval.compare"):
        assert compare.run_command([a, b], out=out) == 0
    lines = out.read_text().splitlines()
    assert lines[4:9] == [
        "| metric | x/seed0 | y/seed0 |", "|---|---:|---:|",
        "| expression_accuracy | 0.5000 | **0.7500** (+0.2500) |",
        "| au_mean_f1 | 0.2500 | 0.2500 (+0.0000) |",  # a tie between all runs: no best
        "| va_mean_ccc | - | 0.1000 |"]
    assert f"- y/seed0: {b / 'metrics.json'} (step 20)" in lines
    assert caplog.records[0].getMessage().splitlines()[1:6] == [
        "metric                x/seed0             y/seed0",
        "-------------------------------------------------",
        "expression_accuracy  0.5000    0.7500 (+0.2500) *",
        "au_mean_f1           0.2500    0.2500 (+0.0000)",
        "va_mean_ccc               -    0.1000"]
    per_source = compare.compare([a, b], per_source=True)
    assert per_source.rows[-1] == ("b/va_mean_ccc", (None, 0.2))


def test_compare_reads_eval_files_when_asked_for_another_split(tmp_path):
    run = _run_dir(tmp_path / "run", {"step": 8.0, "test/expression_accuracy": 0.5}, evals={
        "validation_step4.json": {"step": 4.0, "validation/expression_accuracy": 0.25},
        "validation_step8.json": {"step": 8.0, "validation/expression_accuracy": 0.375},
        # Partial evaluations (evaluators chosen by name) are not read; a whole one of two
        # splits is read for either.
        "validation@validation_step9.json": {"step": 9.0, "validation/expression_accuracy": 1.0},
        "test+validation_step2.json": {"step": 2.0, "test/expression_accuracy": 0.125,
                                       "validation/expression_accuracy": 0.0}})
    loaded = compare.load_run(run, "validation")
    assert (loaded.file, loaded.step, loaded.split) == (
        run / "eval" / "validation_step8.json", 8, "validation")
    assert compare.compare([run], "validation").rows == (("expression_accuracy", (0.375,)),)
    assert compare.load_run(run).file == run / "metrics.json"
    (run / "metrics.json").unlink()  # an interrupted run: its latest evaluation
    assert compare.load_run(run).file == run / "eval" / "validation_step8.json"
    (run / "eval" / "validation_step8.json").unlink()
    (run / "eval" / "validation_step4.json").unlink()
    assert compare.load_run(run, "test").file == run / "eval" / "test+validation_step2.json"
    with pytest.raises(UserError, match="has step-2 metrics of the splits test, validation"):
        compare.load_run(run)


def test_compare_errors(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        compare.compare([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a run's work directory"):
        compare.compare([tmp_path / "empty"])
    unevaluated = _run_dir(tmp_path / "unevaluated")
    with pytest.raises(UserError, match=r"has no metrics: .*fbnet eval --workdir"):
        compare.compare([unevaluated])
    test_only = _run_dir(tmp_path / "test_only", {"test/expression_accuracy": 0.5})
    with pytest.raises(UserError, match="has no metrics of split 'validation'"):
        compare.compare([test_only], "validation")
    broken = _run_dir(tmp_path / "broken")
    (broken / "metrics.json").write_text("{")
    with pytest.raises(UserError, match=r"metrics.json: not valid JSON"):
        compare.compare([broken])
    other = _run_dir(tmp_path / "other", evals={
        "validation_step2.json": {"validation/expression_accuracy": 0.5}})
    with pytest.raises(UserError, match=r"different splits \(test_only: test, other: "
                                        r"validation\); choose one with --split"):
        compare.compare([test_only, other])
    with pytest.raises(UserError, match="give the work directories"):
        compare.compare([])
    # A final evaluation of two splits in the records (no metrics.json): one must be chosen.
    recorded = _run_dir(tmp_path / "recorded")
    with metrics_log.Writer(recorded, None) as writer:
        writer.write("final", 4, {"step": 4.0, "test/expression_accuracy": 0.5,
                                  "validation/expression_accuracy": 0.25})
    with pytest.raises(UserError, match=r"recorded/metrics.jsonl: the evaluation of step 4 "
                                        r"holds the splits test, validation; choose one"):
        compare.load_run(recorded)
    assert compare.load_run(recorded, "validation").results["validation/expression_accuracy"] \
        == 0.25
    with pytest.raises(UserError, match="cannot write"):
        compare.run_command([test_only], out=test_only / "metrics.json" / "compare.md")


# --- Real runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two 2-step tiny runs (seeds 0 and 1), evaluated on validation after step 1 and on test at
    the end."""
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for seed in (0, 1):
        config = load_config("synthetic.py", "tiny")
        config.seed = seed
        config.train.num_steps = 2
        config.train.log_every = 1
        config.evals.validation.every = 1
        config.train.best_metric = ""
        train.train_and_evaluate(config, root / f"seed{seed}")
        runs.append(root / f"seed{seed}")
    return runs


def test_compare_two_runs_shows_their_metrics(tiny_runs, tmp_path):
    saved = [json.loads((run / "metrics.json").read_text()) for run in tiny_runs]
    comparison = compare.compare(tiny_runs)
    assert comparison.split == "test"
    assert [run.name for run in comparison.runs] == ["seed0", "seed1"]
    assert [run.step for run in comparison.runs] == [2, 2]
    expected = [(m, (saved[0][f"test/{m}"], saved[1][f"test/{m}"]))
                for m in compare.COMPARED_METRICS if f"test/{m}" in saved[0]]
    assert list(comparison.rows) == expected
    assert len(expected) == 10  # the tiny mixture labels every task; no compound expressions
    out = tmp_path / "compare.md"
    compare.run_command(tiny_runs, out=out)
    first, second = saved[0]["test/au_mean_f1"], saved[1]["test/au_mean_f1"]
    cells = [f"{first:.4f}", f"{second:.4f}"]
    cells[int(second > first)] = f"**{cells[int(second > first)]}**"
    assert f"| au_mean_f1 | {cells[0]} | {cells[1]} ({second - first:+.4f}) |" in \
        out.read_text().splitlines()


def test_report_of_a_tiny_run(tiny_runs, tmp_path):
    workdir = tiny_runs[0]
    results = json.loads((workdir / "metrics.json").read_text())
    config, step = evaluate.checkpoint_config(workdir)
    mesh = parallel.create_mesh()
    model, _, _, abstract = state_lib.create_state(config, mesh, abstract=True)
    manager = checkpointing.create_manager(workdir, read_only=True)
    try:
        state, _ = checkpointing.restore(manager, abstract, step=step)
    finally:
        manager.close()
    outputs, labels = evaluate.predict(model, state, config, "test", mesh)
    paths = report.report_for_evaluation(results, "test", tmp_path / "report", outputs, labels,
                                         workdir)
    _check_pngs(tmp_path / "report", list(PNG_SIZES), paths[1])
    # The curves of the run's records: a logged step per step (log_every 1), the validation
    # after step 1.
    curves = report_plots.training_curves(metrics_log.read(workdir)[0])
    assert set(curves) == {"loss/total", "loss/au", "loss/expression", "loss/va",
                           "learning_rate", *(f"validation/{key}" for key, _ in
                                              report.HEADLINE_METRICS)}
    assert all(list(points) == ([1] if name.startswith("validation/") else [1, 2])
               for name, points in curves.items())
    # A report that cannot be written does not fail the evaluation.
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the report folder would go")
    assert report.report_for_evaluation(results, "test", blocked, outputs, labels) is None


def _tiny_report(workdir, out):
    """The report of a tiny run's final metrics (no predictions), Markdown text."""
    results = json.loads((workdir / "metrics.json").read_text())
    md_path, _ = report.write_report(results, "test", out, workdir=workdir)
    return md_path.read_text()


def test_report_and_compare_read_the_records_not_train_log(tiny_runs, tmp_path):
    run = shutil.copytree(tiny_runs[0], tmp_path / "run")
    (run / "train.log").unlink()
    markdown = _tiny_report(run, tmp_path / "report")
    assert _section(markdown, "Training curves").strip().splitlines() == [
        "![Training curves](training_curves.png)", "", f"From {run / 'metrics.jsonl'}."]
    records, _ = metrics_log.read(run)
    [periodic] = [r for r in records if r.kind == "eval"]
    [final] = [r for r in records if r.kind == "final"]
    # Without metrics.json, compare takes the run's latest evaluation of the split from its
    # records: the final one, or the periodic one on validation.
    (run / "metrics.json").unlink()
    loaded = compare.load_run(run)
    assert (loaded.file, loaded.split, loaded.step) == (run / "metrics.jsonl", "test", 2)
    assert loaded.results == final.values
    loaded = compare.load_run(run, "validation")
    assert (loaded.split, loaded.step, loaded.results) == ("validation", 1, periodic.values)
    assert compare.compare([run], "validation").rows[0] == (
        "expression_accuracy", (periodic.values["validation/expression_accuracy"],))


def test_a_run_without_metrics_jsonl_reports_from_its_train_log(tiny_runs, tmp_path, caplog):
    run = shutil.copytree(tiny_runs[0], tmp_path / "old")
    (run / "metrics.jsonl").unlink()
    with caplog.at_level(logging.INFO, logger="fbnet_jax.eval.metrics_log"):
        old = _tiny_report(run, tmp_path / "old_report")
    assert "has no metrics.jsonl (a run from before it): reading its records from" in caplog.text
    new = _tiny_report(tiny_runs[0], tmp_path / "report")
    # The same report, but where the curves were read from.
    assert old.replace(str(run / "train.log"), "RECORDS") == new.replace(
        str(tiny_runs[0] / "metrics.jsonl"), "RECORDS")
    # The same records, as train.log printed them; the log has no final evaluation.
    records, _ = metrics_log.read(tiny_runs[0])
    migrated, _ = metrics_log.read(run)
    records = [r for r in records if r.kind != "final"]
    assert [(r.kind, r.step) for r in migrated] == [(r.kind, r.step) for r in records]
    precision = {"learning_rate": 1e-3, "steps_per_second": 1e-2, "examples_per_second": 1.0}
    for old_record, record in zip(migrated, records):
        assert set(old_record.values) <= set(record.values)
        for name, value in old_record.values.items():
            assert value == pytest.approx(record.values[name], rel=precision.get(name, 0),
                                          abs=0 if name in precision else 5e-5), name
    assert (report_plots.training_curves(migrated).keys()
            == report_plots.training_curves(records).keys())
    # Continuing such a run writes its train.log's records into metrics.jsonl once.
    with caplog.at_level(logging.INFO, logger="fbnet_jax.eval.metrics_log"):
        with metrics_log.Writer(run, 1):
            pass
    assert f"{run / 'metrics.jsonl'}: 3 records of the invocations before this one read from " \
           f"{run / 'train.log'}" in caplog.text
    assert [(r.kind, r.step) for r in metrics_log.read(run)[0]] == [
        ("start", 0), ("train", 1), ("eval", 1), ("start", 1)]
