"""benchmarks/ablation.py on fake run directories: no model is trained here."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from conftest import load_benchmark, load_config

ablation = load_benchmark("ablation")

STEPS = 7
KEYS = ("test/expression_accuracy", "test/expression_macro_f1", "test/au_mean_f1",
        "test/au_tuned_mean_f1", "test/va_mean_ccc")
CLASSES = ["Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise"]
ROWS = ["expression only", "AU only", "multi-task", "+ co-annotation (soft)"]
# row -> per seed: (expr acc, expr F1, AU F1, AU F1 tuned, VA CCC), wall seconds (None: no
# file), predictions per class (None: no report file). A row that does not train a task still has
# its metrics in metrics.json (the heads exist); the tables must not show them.
FAKE = {
    "multi-task": [((0.50, 0.40, 0.10, 0.20, 0.50), 100.0, [20, 20, 10, 10, 20, 10, 10]),
                   ((0.60, 0.50, 0.20, 0.30, 0.40), 110.0, [15, 15, 15, 15, 15, 15, 10]),
                   ((0.40, 0.30, 0.15, 0.25, 0.45), 120.0, [10, 10, 10, 10, 10, 10, 40])],
    "expression only": [((0.30, 0.20, 0.01, 0.02, 0.03), 80.0, [50, 10, 10, 10, 10, 5, 5]),
                        ((0.35, 0.25, 0.01, 0.02, 0.03), 80.0, [85, 0, 0, 5, 5, 5, 0]),
                        ((0.25, 0.15, 0.01, 0.02, 0.03), 81.0, [30, 10, 10, 10, 10, 10, 20])],
    "AU only": [((0.14, 0.03, 0.12, 0.20, 0.0), None, [100, 0, 0, 0, 0, 0, 0]),
                ((0.14, 0.03, 0.22, 0.30, 0.0), None, [100, 0, 0, 0, 0, 0, 0]),
                ((0.14, 0.03, 0.17, 0.25, 0.0), None, [100, 0, 0, 0, 0, 0, 0])],
    "+ co-annotation (soft)": [
        ((0.50, 0.40, 0.40, 0.30, 0.40), 90.0, [20, 20, 10, 10, 20, 10, 10]),
        ((0.50, 0.50, 0.40, 0.50, 0.30), 95.0, [20, 20, 10, 10, 20, 10, 10]),
        ((0.40, 0.30, 0.40, 0.20, 0.40), 100.0, None)],
}
SLUGS = {"multi-task": "multi_task", "expression only": "expression_only", "AU only": "AU_only",
         "+ co-annotation (soft)": "co_annotation_soft"}


def _confusion(predicted: list[int]) -> list[list[int]]:
    """A 7x7 matrix (rows true) whose column sums are `predicted`, spread over two rows."""
    counts = np.zeros((7, 7), np.int64)
    counts[0] = [p // 2 for p in predicted]
    counts[3] = [p - p // 2 for p in predicted]
    return counts.tolist()


def _fake_run(workdir, values, seconds, predicted, commit=None):
    workdir.mkdir(parents=True)
    (workdir / "metrics.json").write_text(json.dumps(
        {"step": float(STEPS), **dict(zip(KEYS, values)), "test/au_count": 400.0}))
    if seconds is not None:
        (workdir / "wall_seconds.json").write_text(json.dumps(seconds))
    if predicted is not None:
        (workdir / "report").mkdir()
        (workdir / "report" / "expression_confusion.json").write_text(json.dumps(
            {"split": "test", "classes": CLASSES, "rows": "true class",
             "columns": "predicted class", "counts": _confusion(predicted)}))
    if commit is not None:
        (workdir / "commit.txt").write_text(commit + "\n")


def _fake_regime(out, regime="matched", rows=FAKE, commit=None):
    for row in rows:
        for seed, (values, seconds, predicted) in enumerate(FAKE[row]):
            _fake_run(out / regime / f"steps{STEPS}" / SLUGS[row] / f"seed{seed}", values,
                      seconds, predicted, commit)


@pytest.fixture
def no_training(monkeypatch):
    """Makes any fbnet process a test failure."""
    def fail(*args, **kwargs):
        raise AssertionError(f"fbnet was run: {args}")
    monkeypatch.setattr(ablation, "_fbnet", fail)


def test_verdict_rule():
    better, worse, none = "better", "worse", ablation.NO_DIFFERENCE
    assert none == "no difference measurable here"
    # Every seed agrees: an effect, however small against its spread.
    assert ablation.verdict([0.01, 0.5, 0.002]) == better
    assert ablation.verdict([-0.3, -0.001]) == worse
    # Mixed signs: only where |mean| > 2 sample std (ddof 1). Nine 1s and a -0.1: mean 0.89,
    # std 0.3479 (ddof 0 would give 0.33); a zero is no sign.
    assert ablation.verdict([1.0] * 9 + [-0.1]) == better
    assert ablation.verdict([-1.0] * 9 + [0.1]) == worse
    assert ablation.verdict([0.1] * 5 + [0.0]) == better  # mean 0.0833 > 2 x 0.0408
    # Within twice the spread: 0.1 x 4 and 0: mean 0.08, 2 std 0.0894.
    assert ablation.verdict([0.1] * 4 + [0.0]) == none
    # The sample std (ddof 1), not the population's: mean 0.825, 2 std 0.857 (ddof 0: 0.783).
    assert ablation.verdict([1.0] * 5 + [-0.05]) == none
    assert ablation.verdict([0.3, -0.1, 0.2]) == none
    assert ablation.verdict([0.0, 0.0, 0.0]) == none
    # One seed has neither another seed to agree with nor a spread.
    assert ablation.verdict([0.9]) == none
    assert ablation.verdict([-0.9]) == none


def test_tables_paired_differences_and_verdicts(tmp_path):
    _fake_regime(tmp_path)
    result = ablation.collect(tmp_path, "matched", ROWS, 3, STEPS)
    assert result["baseline"] == "multi-task"
    assert ablation.table(result).splitlines() == [
        "| row | seeds | expr acc | expr F1 | AU F1 | AU F1 tuned | VA CCC | wall s / run "
        "| one class > 80% |",
        "|---|---|---|---|---|---|---|---|---|",
        "| expression only | 3 | 0.3000 ± 0.0500 | 0.2000 ± 0.0500 | - | - | - | 80 "
        "| seed 1 Neutral 85% |",
        "| AU only | 3 | - | - | 0.1700 ± 0.0500 | 0.2500 ± 0.0500 | - | - | - |",
        "| multi-task | 3 | 0.5000 ± 0.1000 | 0.4000 ± 0.1000 | 0.1500 ± 0.0500 "
        "| 0.2500 ± 0.0500 | 0.4500 ± 0.0500 | 110 | no |",
        "| + co-annotation (soft) | 3 | 0.4667 ± 0.0577 | 0.4000 ± 0.1000 | 0.4000 ± 0.0000 "
        "| 0.3333 ± 0.1528 | 0.3667 ± 0.0577 | 95 | 1 seed(s) without a histogram |"]
    differences = ablation.paired_differences(result)
    assert list(differences) == ["expression only", "AU only", "+ co-annotation (soft)"]
    # A single-task row is compared on its own task only.
    assert sorted(differences["AU only"]) == ["test/au_mean_f1", "test/au_tuned_mean_f1"]
    np.testing.assert_allclose(differences["+ co-annotation (soft)"]["test/au_mean_f1"],
                               [0.3, 0.2, 0.25])
    assert ablation.differences_table(result).splitlines() == [
        "| row | expr acc | expr F1 | AU F1 | AU F1 tuned | VA CCC |",
        "|---|---|---|---|---|---|",
        "| expression only | -0.2000 ± 0.0500 (0/3) | -0.2000 ± 0.0500 (0/3) | - | - | - |",
        "| AU only | - | - | +0.0200 ± 0.0000 (3/3) | +0.0000 ± 0.0000 (0/3) | - |",
        "| + co-annotation (soft) | -0.0333 ± 0.0577 (0/3) | +0.0000 ± 0.0000 (0/3) "
        "| +0.2500 ± 0.0500 (3/3) | +0.0833 ± 0.1258 (2/3) | -0.0833 ± 0.0289 (0/3) |"]
    assert ablation.verdict_lines(result) == [
        "Effects against multi-task, claimed where every seed agrees or |mean| > 2 sample std of "
        "the paired differences:",
        "- expression only, expr acc: worse (-0.2000 ± 0.0500, 0/3 seeds improve)",
        "- expression only, expr F1: worse (-0.2000 ± 0.0500, 0/3 seeds improve)",
        "- AU only, AU F1: better (+0.0200 ± 0.0000, 3/3 seeds improve)",
        "- + co-annotation (soft), AU F1: better (+0.2500 ± 0.0500, 3/3 seeds improve)",
        "- + co-annotation (soft), VA CCC: worse (-0.0833 ± 0.0289, 0/3 seeds improve)",
        "No difference measurable here:",
        "- AU only: AU F1 tuned",
        "- + co-annotation (soft): expr acc, expr F1, AU F1 tuned"]


def test_prediction_histogram_and_collapse_flag(tmp_path):
    _fake_regime(tmp_path, rows=["expression only"])
    workdir = tmp_path / "matched" / f"steps{STEPS}" / "expression_only" / "seed1"
    assert ablation.prediction_histogram(workdir) == {
        "Neutral": 85, "Anger": 0, "Disgust": 0, "Fear": 5, "Happiness": 5, "Sadness": 5,
        "Surprise": 0}
    assert ablation.dominant_class({"Neutral": 85, "Happiness": 15}) == ("Neutral", 0.85)
    # More than 80%, strictly.
    assert ablation.dominant_class({"Neutral": 80, "Happiness": 20}) is None
    assert ablation.dominant_class({"Neutral": 0, "Happiness": 0}) is None
    assert ablation.prediction_histogram(tmp_path) is None
    entry = {"tasks": ["expression"], "seeds": [
        {"seed": 0, "prediction_histogram": {"Neutral": 85, "Anger": 15}},
        {"seed": 1, "prediction_histogram": {"Neutral": 50, "Anger": 50}},
        {"seed": 2, "prediction_histogram": {"Neutral": 0, "Surprise": 233}}]}
    assert ablation._collapse_cell(entry) == "seed 0 Neutral 85%, seed 2 Surprise 100%"
    assert ablation._collapse_cell({**entry, "tasks": ["au"]}) == "-"


def test_estimated_regime_is_paired_with_the_mismatched_multi_task(tmp_path):
    _fake_regime(tmp_path, "mismatched", rows=["multi-task"])
    _fake_regime(tmp_path, "estimated", rows=["+ co-annotation (soft)"])
    # Rows without a coupling read no table: the estimated regime does not train them.
    assert ablation.plan("estimated", ROWS) == [
        ("multi-task (the mismatched regime's runs)", "multi-task", "mismatched"),
        ("+ co-annotation (soft)", "+ co-annotation (soft)", "estimated")]
    result = ablation.collect(tmp_path, "estimated", ROWS, 3, STEPS)
    assert result["relatedness"] == str(tmp_path / "estimated" / "relatedness.json")
    lines = ablation.differences_table(result).splitlines()
    assert lines[2:] == [
        "| + co-annotation (soft) | -0.0333 ± 0.0577 (0/3) | +0.0000 ± 0.0000 (0/3) "
        "| +0.2500 ± 0.0500 (3/3) | +0.0833 ± 0.1258 (2/3) | -0.0833 ± 0.0289 (0/3) |"]
    assert ablation.verdict_lines(result)[0].startswith(
        "Effects against multi-task (the mismatched regime's runs), claimed where")


def test_finished_runs_are_not_run_again(tmp_path, no_training, capsys):
    _fake_regime(tmp_path, commit="abc1234")
    ablation.main(["--regime", "matched", "--seeds", "3", "--steps", str(STEPS),
                   "--out", str(tmp_path), "--rows", "expression only,AU only,"
                   "+ co-annotation (soft)"])  # multi-task is added: the differences need it
    printed = capsys.readouterr().out
    assert ("\ncommand: python benchmarks/ablation.py --regime matched --seeds 3 --steps 7 "
            f"--out {tmp_path} --rows 'expression only,AU only,+ co-annotation (soft)'\n"
            ) in printed
    assert "\nruns: 12, 0 trained now, 12 reused; trained at: abc1234 (12)\n" in printed
    assert "\ntotal wall time: " in printed
    assert "\n## matched: configs/ablation.py:matched, 7 steps, seeds 0-2, relatedness " in printed
    assert "| expression only | 3 | 0.3000 ± 0.0500 | 0.2000 ± 0.0500 | - | - | - | 80 " \
        "| seed 1 Neutral 85% |" in printed
    assert "\n- + co-annotation (soft), AU F1: better (+0.2500 ± 0.0500, 3/3 seeds improve)\n" \
        in printed
    # results.json: every seed's metrics, wall time, commit and prediction histogram.
    saved = json.loads((tmp_path / "matched" / "steps7" / "results.json").read_text())
    assert list(saved["rows"]) == ROWS
    seed = saved["rows"]["expression only"]["seeds"][1]
    assert seed == {
        "seed": 1, "workdir": str(tmp_path / "matched" / "steps7" / "expression_only" / "seed1"),
        "metrics": dict(zip(KEYS, (0.35, 0.25, 0.01, 0.02, 0.03))), "wall_seconds": 80.0,
        "commit": "abc1234", "prediction_histogram": {
            "Neutral": 85, "Anger": 0, "Disgust": 0, "Fear": 5, "Happiness": 5, "Sadness": 5,
            "Surprise": 0}}
    assert saved["steps"] == STEPS and saved["baseline"] == "multi-task"
    paired = saved["paired_differences"]["expression only"]
    assert list(paired) == ["test/expression_accuracy", "test/expression_macro_f1"]
    assert paired["test/expression_macro_f1"]["verdict"] == "worse"
    np.testing.assert_allclose(paired["test/expression_macro_f1"]["values"], [-0.2, -0.25, -0.15])


def test_missing_runs_are_trained_at_their_budget(tmp_path, monkeypatch):
    calls = []

    def fake_fbnet(*args, log):
        calls.append(list(args))
        if args[0] == "relatedness":
            (tmp_path / "estimated" / "relatedness.json").write_text("{}")
            return 1.0
        workdir = tmp_path.joinpath(args[args.index("--workdir") + 1])
        assert log == workdir / "console.log"
        (workdir / "metrics.json").write_text(json.dumps(dict.fromkeys(KEYS, 0.5)))
        return 12.5

    monkeypatch.setattr(ablation, "_fbnet", fake_fbnet)
    rows = ["multi-task", "+ both"]
    assert ablation.run_all(tmp_path, ["estimated"], rows, 2, STEPS, "abc1234 + uncommitted "
                            "changes") == 4
    table = str(tmp_path / "estimated" / "relatedness.json")
    run = tmp_path / "estimated" / "steps7" / "both" / "seed1"
    assert calls == [
        ["relatedness", "--config", "configs/ablation.py:mismatched", "--out", table],
        *[["train", "--config", "configs/ablation.py:mismatched", "--workdir",
           str(tmp_path / regime / "steps7" / slug / f"seed{seed}"), f"--config.seed={seed}",
           "--config.train.num_steps=7", *overrides]
          for seed in (0, 1) for regime, slug, overrides in (
              ("mismatched", "multi_task", []),
              ("estimated", "both", [
                  "--config.loss.weights.co_annotation=1.0",
                  "--config.loss.co_annotation.au_targets=soft",
                  "--config.loss.weights.distribution_matching=1.0",
                  "--config.loss.distribution_matching.stop_gradient=False",
                  f"--config.loss.relatedness={table}"]))]]
    assert json.loads((run / "wall_seconds.json").read_text()) == 12.5
    assert (run / "commit.txt").read_text() == "abc1234 + uncommitted changes\n"
    # Done: nothing runs again, not even the table. At another budget, every run is new.
    calls.clear()
    assert ablation.run_all(tmp_path, ["estimated"], rows, 2, STEPS, "x") == 0
    assert calls == []
    assert ablation.run_all(tmp_path, ["estimated"], rows, 1, 9, "x") == 2
    assert [call[4] for call in calls] == [
        str(tmp_path / "mismatched" / "steps9" / "multi_task" / "seed0"),
        str(tmp_path / "estimated" / "steps9" / "both" / "seed0")]


def test_the_default_budget_is_the_configs():
    for variant in ("matched", "mismatched"):
        assert ablation.budget(variant, None) == load_config(
            "ablation.py", variant).train.num_steps
    assert ablation.budget("estimated", 9) == 9


def test_a_failed_run_stops_the_script_with_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(ablation.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, returncode=3))
    log = tmp_path / "console.log"
    with pytest.raises(SystemExit, match=f"fbnet train --x failed with status 3; see {log}"):
        ablation._fbnet("train", "--x", log=log)


def test_source_version_says_when_tracked_files_changed(monkeypatch):
    answers = {("rev-parse", "--short", "HEAD"): "abc1234",
               ("status", "--porcelain", "--untracked-files=no"): ""}
    monkeypatch.setattr(ablation, "_git", lambda *args: answers[args])
    assert ablation.source_version() == "abc1234"
    answers[("status", "--porcelain", "--untracked-files=no")] = " M fbnet_jax/model/losses.py"
    assert ablation.source_version() == "abc1234 + uncommitted changes"
    monkeypatch.setattr(ablation, "_git", lambda *args: None)
    assert ablation.source_version() == "unknown (not a git checkout)"
