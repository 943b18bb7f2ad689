r"""What each part of FaceBehaviorNet's method does, on scarce labels (configs/ablation.py).

Trains every row below with several seeds (`config.seed`: initialisation, dropout, data order;
the synthetic world stays the same) and prints one markdown table: mean ± sample standard
deviation over the seeds of the test metrics, and the wall time. Each run is a separate
`fbnet train` process in OUT/<regime>/<row>/seed<S>; a run that already has its metrics.json is
not run again, and an interrupted one continues from its checkpoint, so the script can be
stopped and started again.

  python benchmarks/ablation.py --regime matched [--seeds 3] [--out runs/ablation]
  python benchmarks/ablation.py --regime mismatched

Rows: single-task expression, AU and VA; multi-task without coupling; + co-annotation;
+ distribution matching (stop-gradient off and on); + both (off and on). The mismatched regime
adds rows with a relatedness table estimated from the training data (`fbnet relatedness`)
instead of Du et al.'s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METRICS = (("test/expression_accuracy", "expr acc", "expression"),
           ("test/expression_macro_f1", "expr F1", "expression"),
           ("test/au_mean_f1", "AU F1", "au"),
           ("test/va_mean_ccc", "VA CCC", "va"))
TASK_OFF = {"expression": 0.0, "au": 0.0, "va": 0.0}


def _weights(**weights) -> list[str]:
    return [f"--config.loss.weights.{name}={value}" for name, value in weights.items()]


# name -> (trained tasks, config overrides); the couplings are off unless a row turns them on.
ROWS = {
    "expression only": (("expression",), _weights(**{**TASK_OFF, "expression": 1.0})),
    "AU only": (("au",), _weights(**{**TASK_OFF, "au": 1.0})),
    "VA only": (("va",), _weights(**{**TASK_OFF, "va": 1.0})),
    "multi-task": (("expression", "au", "va"), []),
    "+ co-annotation": (("expression", "au", "va"), _weights(co_annotation=1.0)),
    "+ distribution matching": (("expression", "au", "va"), _weights(distribution_matching=1.0)),
    "+ distribution matching (stop-gradient)": (
        ("expression", "au", "va"),
        _weights(distribution_matching=1.0)
        + ["--config.loss.distribution_matching.stop_gradient=True"]),
    "+ both": (("expression", "au", "va"),
               _weights(co_annotation=1.0, distribution_matching=1.0)),
    "+ both (stop-gradient)": (("expression", "au", "va"),
                              _weights(co_annotation=1.0, distribution_matching=1.0)
                              + ["--config.loss.distribution_matching.stop_gradient=True"]),
}
ESTIMATED_ROWS = ("+ co-annotation", "+ distribution matching", "+ both")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").replace("__", "_")


def _fbnet(*args: str, log: Path) -> float:
    """Runs `fbnet ARGS` (output to `log`); returns its wall time; raises on failure."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        result = subprocess.run([sys.executable, "-m", "fbnet_jax.main", *args], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode:
        raise SystemExit(f"fbnet {' '.join(args)} failed with status {result.returncode}; "
                         f"see {log}")
    return time.perf_counter() - start


def run(regime: str, seeds: int, out: Path, rows: list[str]) -> dict:
    """Runs (or reuses) every (row, seed); returns {row: {"metrics": [...], "seconds": [...]}}."""
    config = f"configs/ablation.py:{regime}"
    base = out / regime
    base.mkdir(parents=True, exist_ok=True)
    plan = [(name, *ROWS[name], []) for name in rows]
    if regime == "mismatched":
        table = base / "relatedness.json"
        if not table.exists():
            _fbnet("relatedness", "--config", config, "--out", str(table),
                   log=base / "relatedness.log")
        plan += [(f"{name} (estimated table)", *ROWS[name],
                  [f"--config.loss.relatedness={table}"])
                 for name in ESTIMATED_ROWS if name in rows]
    results = {}
    for name, tasks, overrides, extra in plan:
        entry = results[name] = {"tasks": list(tasks), "metrics": [], "seconds": []}
        for seed in range(seeds):
            workdir = base / _slug(name) / f"seed{seed}"
            done = workdir / "metrics.json"
            timing = workdir / "wall_seconds.json"
            if not done.exists():
                workdir.mkdir(parents=True, exist_ok=True)
                seconds = _fbnet("train", "--config", config, "--workdir", str(workdir),
                                 f"--config.seed={seed}", *overrides, *extra,
                                 log=workdir / "console.log")
                timing.write_text(json.dumps(seconds))
                print(f"{name}, seed {seed}: {seconds:.0f} s", flush=True)
            metrics = json.loads(done.read_text())
            entry["metrics"].append({key: metrics.get(key) for key, _, _ in METRICS})
            entry["seconds"].append(json.loads(timing.read_text()) if timing.exists() else None)
    (base / "results.json").write_text(json.dumps(results, indent=2))
    return results


def table(results: dict) -> str:
    """Markdown: one row per ablation row, mean ± sample std over seeds; '-' for untrained tasks."""
    header = ["row", "seeds"] + [title for _, title, _ in METRICS] + ["wall s / run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in results.items():
        cells = [name, str(len(entry["metrics"]))]
        for key, _, task in METRICS:
            values = np.array([m[key] for m in entry["metrics"] if m[key] is not None], float)
            if task not in entry["tasks"] or not len(values):
                cells.append("-")
            else:
                std = values.std(ddof=1) if len(values) > 1 else 0.0
                cells.append(f"{values.mean():.4f} ± {std:.4f}")
        seconds = [s for s in entry["seconds"] if s is not None]
        cells.append(f"{np.mean(seconds):.0f}" if seconds else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/ablation.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--regime", choices=("matched", "mismatched"), required=True,
                        help="the generator's AU table: the couplings' prior, or another")
    parser.add_argument("--seeds", type=int, default=3, help="runs per row (config.seed 0..N-1)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "ablation",
                        help="where the runs go")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated subset of: {', '.join(ROWS)}")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or args.seeds < 1:
        parser.error(f"unknown rows {unknown}" if unknown else "--seeds must be >= 1")
    start = time.perf_counter()
    results = run(args.regime, args.seeds, args.out.resolve(), rows)
    print(f"\nregime {args.regime!r}, {args.seeds} seeds, configs/ablation.py:{args.regime} "
          f"({time.perf_counter() - start:.0f} s in this invocation)\n")
    print(table(results))


if __name__ == "__main__":
    main()
