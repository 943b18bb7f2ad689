r"""What each part of FaceBehaviorNet's method does, on scarce labels (configs/ablation.py).

Trains every row below with several seeds (`config.seed` 0..N-1: initialisation, dropout, data
order; the synthetic world stays the same) and prints, per regime, markdown tables of the test
metrics (mean ± sample standard deviation over the seeds) and of the paired differences from
multi-task (row minus multi-task of the same seed), then which differences are effects:

  python benchmarks/ablation.py --regime all [--seeds 5] [--steps N] [--out runs/ablation]

Rows: single-task expression, AU and VA; multi-task without coupling; + co-annotation with soft
and with hard AU targets; + distribution matching with gradients through its targets and with
stop-gradient targets; + both (co-annotation soft and distribution matching through its targets,
the paper's default). Regimes: "matched" (the faces' AUs follow the table the couplings assume),
"mismatched" (they follow another table) and "estimated" (the mismatched world, the couplings
reading the table that `fbnet relatedness` estimates from its training data). The estimated
regime trains the coupling rows only; the others read no table, so its multi-task, the base of its
paired differences, is the mismatched regime's.

Columns: expression accuracy and macro F1, AU mean F1 at threshold 0.5 and at the thresholds tuned
on validation, VA mean CCC, the wall time of one `fbnet train` process, and the seeds whose
predictions put more than 80% of the test faces in one expression class (from the run's
report/expression_confusion.json). A task a row does not train is shown as "-"; a single-task row
is compared with multi-task on its task only.

An effect is claimed only where every seed agrees (all paired differences of one strict sign) or
the mean paired difference exceeds twice their sample standard deviation; everything else is
"no difference measurable here" (`verdict`).

Each run is a separate `fbnet train` process in OUT/<regime>/steps<N>/<row>/seed<S>, so a run at
another step budget is never taken for this one. A run that already has its metrics.json is not
run again, and an interrupted one continues from its checkpoint: the script can be stopped and
started again. Runs go seed by seed (every row of seed 0 first), so an interrupted ablation
already has complete pairs. OUT/<regime>/steps<N>/results.json gets every seed's metrics, wall
time, commit and prediction histogram, and every row's paired differences with their verdicts.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fbnet_jax.core import config_files
from fbnet_jax.eval import report
from fbnet_jax.train import loop as train

CONFIG = "configs/ablation.py"
# (metrics.json key, column, task); every metric is higher-is-better.
METRICS = (("test/expression_accuracy", "expr acc", "expression"),
           ("test/expression_macro_f1", "expr F1", "expression"),
           ("test/au_mean_f1", "AU F1", "au"),
           ("test/au_tuned_mean_f1", "AU F1 tuned", "au"),
           ("test/va_mean_ccc", "VA CCC", "va"))
TASKS = ("expression", "au", "va")
COLLAPSE_SHARE = 0.8  # a seed with more than this share of its predictions in one class is flagged
NO_DIFFERENCE = "no difference measurable here"
WALL_FILE, COMMIT_FILE = "wall_seconds.json", "commit.txt"  # written beside a run's metrics.json


def _weights(**weights: float) -> list[str]:
    return [f"--config.loss.weights.{name}={value}" for name, value in weights.items()]


def _co_annotation(au_targets: str) -> list[str]:
    return _weights(co_annotation=1.0) + [f"--config.loss.co_annotation.au_targets={au_targets}"]


def _distribution_matching(stop_gradient: bool) -> list[str]:
    return _weights(distribution_matching=1.0) + [
        f"--config.loss.distribution_matching.stop_gradient={stop_gradient}"]


# name -> (trained tasks, config overrides). The couplings are off unless a row turns them on, and
# a row that turns one on sets its options, so no row depends on their defaults.
ROWS = {
    "expression only": (("expression",), _weights(expression=1.0, au=0.0, va=0.0)),
    "AU only": (("au",), _weights(expression=0.0, au=1.0, va=0.0)),
    "VA only": (("va",), _weights(expression=0.0, au=0.0, va=1.0)),
    "multi-task": (TASKS, []),
    "+ co-annotation (soft)": (TASKS, _co_annotation("soft")),
    "+ co-annotation (hard)": (TASKS, _co_annotation("hard")),
    "+ distribution matching": (TASKS, _distribution_matching(False)),
    "+ distribution matching (stop-gradient)": (TASKS, _distribution_matching(True)),
    "+ both": (TASKS, _co_annotation("soft") + _distribution_matching(False)),
}
BASELINE = "multi-task"  # every other row's paired differences are against it
COUPLED = tuple(name for name in ROWS if name.startswith("+ "))  # the rows that read the table
# regime -> the variant of configs/ablation.py; "estimated" adds the estimated table.
REGIMES = {"matched": "matched", "mismatched": "mismatched", "estimated": "mismatched"}
REFERENCE = "multi-task (the mismatched regime's runs)"  # the estimated regime's baseline row


def _slug(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")


@functools.cache
def _config(variant: str):
    return config_files.load(f"{REPO / CONFIG}:{variant}")


def budget(regime: str, steps: int | None) -> int:
    """The training steps of the regime's runs: `steps`, else configs/ablation.py's."""
    return steps or _config(REGIMES[regime]).train.num_steps


def run_dir(out: Path, regime: str, steps: int, row: str, seed: int) -> Path:
    """The work directory of one run: OUT/<regime>/steps<N>/<row>/seed<S>."""
    return out / regime / f"steps{steps}" / _slug(row) / f"seed{seed}"


def relatedness_table(out: Path) -> Path:
    """The estimated regime's table file (not a function of the step budget)."""
    return out / "estimated" / "relatedness.json"


def plan(regime: str, rows: list[str]) -> list[tuple[str, str, str]]:
    """(label, row, regime of its runs) of the regime's table, in the order of `rows`.

    The estimated regime shows the mismatched multi-task runs as its baseline (they read no
    table), first, and trains only the rows that read one.
    """
    if regime == "estimated":
        return [(REFERENCE, BASELINE, "mismatched")] + [
            (row, row, regime) for row in rows if row in COUPLED]
    return [(row, row, regime) for row in rows]


def _fbnet(*args: str, log: Path) -> float:
    """Runs `fbnet ARGS` (output to `log`); returns its wall time; raises on failure."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as stream:
        result = subprocess.run([sys.executable, "-m", "fbnet_jax", *args], cwd=REPO,
                                env=env, stdout=stream, stderr=subprocess.STDOUT, check=False)
    if result.returncode:
        raise SystemExit(f"fbnet {' '.join(args)} failed with status {result.returncode}; "
                         f"see {log}")
    return time.perf_counter() - start


def train_run(out: Path, regime: str, row: str, seed: int, steps: int | None,
              commit: str) -> bool:
    """Trains one run unless its metrics.json exists; returns whether it trained."""
    steps = budget(regime, steps)
    workdir = run_dir(out, regime, steps, row, seed)
    if (workdir / "metrics.json").exists():
        return False
    workdir.mkdir(parents=True, exist_ok=True)
    relatedness = []
    if regime == "estimated":
        relatedness = [f"--config.loss.relatedness={relatedness_table(out)}"]
    seconds = _fbnet("train", "--config", f"{CONFIG}:{REGIMES[regime]}",
                     "--workdir", str(workdir), f"--config.seed={seed}",
                     f"--config.train.num_steps={steps}", *ROWS[row][1], *relatedness,
                     log=workdir / "console.log")
    # The process that finished the run: one that continued an interrupted run counts only
    # its own part.
    (workdir / WALL_FILE).write_text(json.dumps(seconds))
    (workdir / COMMIT_FILE).write_text(commit + "\n")
    print(f"{regime} / {row} / seed {seed}: {seconds:.0f} s", flush=True)
    return True


def run_all(out: Path, regimes: list[str], rows: list[str], seeds: int, steps: int | None,
            commit: str) -> int:
    """Trains every run of the regimes that is not done yet, seed by seed; returns how many."""
    if "estimated" in regimes:
        path = relatedness_table(out)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _fbnet("relatedness", "--config", f"{CONFIG}:{REGIMES['estimated']}",
                   "--out", str(path), log=path.with_suffix(".log"))
    trained = 0
    for seed in range(seeds):
        for regime in regimes:
            for _, row, runs_regime in plan(regime, rows):
                trained += train_run(out, runs_regime, row, seed, steps, commit)
    return trained


def prediction_histogram(workdir: Path) -> dict[str, int] | None:
    """{class: test faces predicted as it}, from the run's report; None when it has none."""
    path = workdir / train.REPORT_DIR / report.CONFUSION_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return dict(zip(data["classes"], np.sum(data["counts"], axis=0).tolist()))


def dominant_class(histogram: dict[str, int]) -> tuple[str, float] | None:
    """(class, share) when one class holds more than COLLAPSE_SHARE of the predictions."""
    total = sum(histogram.values())
    name = max(histogram, key=histogram.get)
    share = histogram[name] / total if total else 0.0
    return (name, share) if share > COLLAPSE_SHARE else None


def read_seed(workdir: Path, seed: int) -> dict[str, Any]:
    """What the tables need of one finished run."""
    metrics = json.loads((workdir / "metrics.json").read_text())
    wall, commit = workdir / WALL_FILE, workdir / COMMIT_FILE
    return {"seed": seed, "workdir": str(workdir),
            "metrics": {key: metrics.get(key) for key, _, _ in METRICS},
            "wall_seconds": json.loads(wall.read_text()) if wall.exists() else None,
            "commit": commit.read_text().strip() if commit.exists() else None,
            "prediction_histogram": prediction_histogram(workdir)}


def collect(out: Path, regime: str, rows: list[str], seeds: int, steps: int | None) -> dict:
    """The regime's results from its finished runs (see `plan`)."""
    entries = {}
    for label, row, runs_regime in plan(regime, rows):
        runs_steps = budget(runs_regime, steps)
        entries[label] = {"row": row, "tasks": list(ROWS[row][0]), "seeds": [
            read_seed(run_dir(out, runs_regime, runs_steps, row, seed), seed)
            for seed in range(seeds)]}
    return {"regime": regime, "config": f"{CONFIG}:{REGIMES[regime]}",
            "steps": budget(regime, steps),
            "relatedness": str(relatedness_table(out)) if regime == "estimated"
                           else _config(REGIMES[regime]).loss.relatedness,
            "baseline": REFERENCE if regime == "estimated" else BASELINE, "rows": entries}


def verdict(differences) -> str:
    """"better", "worse" or NO_DIFFERENCE for paired differences (row minus baseline, per seed).

    An effect is claimed where every seed agrees (all differences strictly of one sign) or where
    the mean difference exceeds twice their sample standard deviation (ddof 1). A single seed
    claims nothing: it has no other seed to agree with and no spread.
    """
    d = np.asarray(differences, np.float64)
    if len(d) < 2:
        return NO_DIFFERENCE
    if (d > 0).all():
        return "better"
    if (d < 0).all():
        return "worse"
    if abs(d.mean()) > 2 * d.std(ddof=1):
        return "better" if d.mean() > 0 else "worse"
    return NO_DIFFERENCE


def paired_differences(result: dict) -> dict[str, dict[str, np.ndarray]]:
    """{row: {metric key: row minus baseline per seed}}, over the seeds both measured and the
    metrics of the tasks the row trains."""
    base = {s["seed"]: s["metrics"] for s in result["rows"][result["baseline"]]["seeds"]}
    differences = {}
    for label, entry in result["rows"].items():
        if label == result["baseline"]:
            continue
        row = differences[label] = {}
        for key, _, task in METRICS:
            if task not in entry["tasks"]:
                continue
            pairs = [(s["metrics"][key], base[s["seed"]][key]) for s in entry["seeds"]
                     if s["seed"] in base]
            values = [a - b for a, b in pairs if a is not None and b is not None]
            if values:
                row[key] = np.array(values)
    return differences


def _mean_std(values, signed: bool = False) -> str:
    """"mean ± sample std" at 4 decimals; the mean alone for one value."""
    text = f"{np.mean(values):{'+' if signed else ''}.4f}"
    return text + (f" ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else "")


def _improve(d: np.ndarray) -> str:
    return f"{int((d > 0).sum())}/{len(d)}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def _collapse_cell(entry: dict) -> str:
    """The seeds whose predictions put more than COLLAPSE_SHARE in one class, which and how much."""
    if "expression" not in entry["tasks"]:
        return "-"  # an untrained expression head's predictions say nothing of the row
    parts, unrecorded = [], 0
    for s in entry["seeds"]:
        if s["prediction_histogram"] is None:
            unrecorded += 1
        elif (found := dominant_class(s["prediction_histogram"])) is not None:
            parts.append(f"seed {s['seed']} {found[0]} {found[1]:.0%}")
    if unrecorded:
        parts.append(f"{unrecorded} seed(s) without a histogram")
    return ", ".join(parts) or "no"


def table(result: dict) -> str:
    """Markdown: one row per ablation row, mean ± sample std over its seeds."""
    header = ["row", "seeds", *(title for _, title, _ in METRICS), "wall s / run",
              f"one class > {COLLAPSE_SHARE:.0%}"]
    rows = []
    for label, entry in result["rows"].items():
        cells = [label, str(len(entry["seeds"]))]
        for key, _, task in METRICS:
            values = [s["metrics"][key] for s in entry["seeds"] if s["metrics"][key] is not None]
            cells.append(_mean_std(values) if task in entry["tasks"] and values else "-")
        seconds = [s["wall_seconds"] for s in entry["seeds"] if s["wall_seconds"] is not None]
        cells += [f"{np.mean(seconds):.0f}" if seconds else "-", _collapse_cell(entry)]
        rows.append(cells)
    return _markdown(header, rows)


def differences_table(result: dict) -> str:
    """Markdown: per row and metric, the paired differences' mean ± sample std and the seeds
    that improve on the baseline."""
    header = ["row", *(title for _, title, _ in METRICS)]
    rows = [[label, *(f"{_mean_std(d[key], signed=True)} ({_improve(d[key])})" if key in d
                      else "-" for key, _, _ in METRICS)]
            for label, d in paired_differences(result).items()]
    return _markdown(header, rows)


def verdict_lines(result: dict) -> list[str]:
    """One line per (row, metric) with an effect, then the others compactly, row by row."""
    claims, none = [], []
    for label, d in paired_differences(result).items():
        quiet = []
        for key, title, _ in METRICS:
            if key not in d:
                continue
            found = verdict(d[key])
            if found == NO_DIFFERENCE:
                quiet.append(title)
            else:
                claims.append(f"- {label}, {title}: {found} ({_mean_std(d[key], signed=True)}, "
                              f"{_improve(d[key])} seeds improve)")
        if quiet:
            none.append(f"- {label}: {', '.join(quiet)}")
    return ([f"Effects against {result['baseline']}, claimed where every seed agrees or "
             f"|mean| > 2 sample std of the paired differences:"] + (claims or ["- none"])
            + [f"{NO_DIFFERENCE[0].upper()}{NO_DIFFERENCE[1:]}:"] + (none or ["- none"]))


def summary(result: dict) -> str:
    """The regime's section of the printout: its tables and verdicts, as markdown."""
    seeds = max(len(entry["seeds"]) for entry in result["rows"].values())
    lines = [f"## {result['regime']}: {result['config']}, {result['steps']} steps, seeds "
             f"0-{seeds - 1}, relatedness {result['relatedness']}", ""]
    if result["regime"] == "estimated":
        lines += ["Rows without a coupling read no table: they are the mismatched regime's.", ""]
    lines += [table(result), "",
              f"Paired differences, row minus {result['baseline']} of the same seed: mean ± "
              f"sample std (seeds that improve / seeds paired).", "",
              differences_table(result), "", *verdict_lines(result)]
    return "\n".join(lines)


def _git(*args: str) -> str | None:
    result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                            check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def source_version() -> str:
    """The commit of this checkout, "+ uncommitted changes" when tracked files differ from it."""
    head = _git("rev-parse", "--short", "HEAD")
    if head is None:
        return "unknown (not a git checkout)"
    return head + (" + uncommitted changes"
                   if _git("status", "--porcelain", "--untracked-files=no") else "")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python benchmarks/ablation.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--regime", choices=(*REGIMES, "all"), required=True,
                        help="matched: the couplings' prior is the world's table; mismatched: "
                             "it is not; estimated: mismatched, the couplings read the table "
                             "`fbnet relatedness` estimates; all: the three")
    parser.add_argument("--seeds", type=int, default=5, help="runs per row (config.seed 0..N-1)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run (--config.train.num_steps; default: "
                             f"{CONFIG}'s); part of the run directories")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "ablation",
                        help="where the runs go")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated subset of: {', '.join(ROWS)} ({BASELINE} is "
                             f"always run: the paired differences need it)")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}")
    if args.seeds < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--seeds and --steps must be >= 1")
    rows = [r for r in ROWS if r in rows or r == BASELINE]
    regimes = list(REGIMES) if args.regime == "all" else [args.regime]
    out = args.out.resolve()
    command = shlex.join(["python", "benchmarks/ablation.py", *argv])
    commit = source_version()
    start = time.perf_counter()
    trained = run_all(out, regimes, rows, args.seeds, args.steps, commit)
    results = [collect(out, regime, rows, args.seeds, args.steps) for regime in regimes]
    for result in results:
        path = out / result["regime"] / f"steps{result['steps']}" / "results.json"
        paired = {label: {key: {"values": d.tolist(), "verdict": verdict(d)}
                          for key, d in row.items()}
                  for label, row in paired_differences(result).items()}
        path.write_text(json.dumps({"command": command, "commit": commit, **result,
                                    "paired_differences": paired}, indent=2))
    # A run reused from an earlier invocation may come from other code: say which.
    runs = {s["workdir"]: s["commit"] or "not recorded" for result in results
            for entry in result["rows"].values() for s in entry["seeds"]}
    made = ", ".join(f"{name} ({count})" for name, count in Counter(runs.values()).items())
    print(f"\ncommand: {command}\ncommit: {commit}\n"
          f"runs: {len(runs)}, {trained} trained now, {len(runs) - trained} reused; trained at: "
          f"{made}\ntotal wall time: {time.perf_counter() - start:.0f} s in this invocation\n")
    print("\n\n".join(summary(result) for result in results))


if __name__ == "__main__":
    main()
