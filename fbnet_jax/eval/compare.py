"""`fbnet compare`: the headline metrics of several runs side by side.

Each run's metrics come from its `metrics.json` (its final evaluators' metrics) or, when it has
none or it lacks the split asked for, from its latest `eval/{split}_step{N}.json` (written by
`fbnet eval`; files of evaluators chosen by name, `{names}@{split}_step{N}.json`, are partial and
not read), or else from the latest evaluation of the split in its records (`metrics.jsonl`,
fbnet_jax/eval/metrics_log.py): a run stopped before its final evaluation is compared on its latest
periodic one. Rows are metrics, columns runs; the best value of each row is marked
(every metric compared is higher-is-better) and each run after the first shows its difference
from the first. A metric a run did not measure (nothing labelled for it) is '-', never 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from fbnet_jax.core import logs
from fbnet_jax.eval import metrics_log, report
from fbnet_jax.core.errors import UserError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
# `{split}[+{split}...]_step{N}.json`, as fbnet_jax/eval/evaluate.py's `output_stem` names them.
_EVAL_FILE = re.compile(r"^(?P<splits>[^@]+)_step(?P<step>\d+)\.json$")
# The console table's columns, then the challenge scores, tuned-threshold AU F1 and compound
# expressions; all higher-is-better.
COMPARED_METRICS = tuple(key for key, _ in report.HEADLINE_METRICS) + (
    "expression_score", "au_score", "au_tuned_mean_f1",
    "compound_accuracy", "compound_uar", "compound_macro_f1")


@dataclasses.dataclass(frozen=True)
class RunMetrics:
    """One run's metrics: `results` read from `file`, of `split`, at checkpoint `step`."""
    name: str
    workdir: Path
    file: Path
    split: str
    step: int | None
    results: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Rows (metric key after `{split}/`, one value or None per run) of runs on one split."""
    split: str
    runs: tuple[RunMetrics, ...]
    rows: tuple[tuple[str, tuple[float | None, ...]], ...]

    def best(self, values: Sequence[float | None]) -> set[int]:
        """Indices of the highest values of a row, ties included; none when fewer than two runs
        have a value or all of them are equal (nothing to choose)."""
        present = [v for v in values if v is not None and not math.isnan(v)]
        if len(present) < 2 or min(present) == max(present):
            return set()
        return {i for i, v in enumerate(values) if v == max(present)}

    def cells(self, markdown: bool) -> list[list[str]]:
        """Table cells: each value, its difference from the first run's, and the row's best
        marked (Markdown: in bold; text: a trailing '*', others padded so digits line up)."""
        table = []
        for metric, values in self.rows:
            best, first = self.best(values), values[0]
            row = [metric]
            for i, value in enumerate(values):
                if value is None:
                    text, difference = "-", ""
                else:
                    text = f"**{value:.4f}**" if markdown and i in best else f"{value:.4f}"
                    difference = f" ({value - first:+.4f})" if i > 0 and first is not None \
                        else ""
                if markdown:
                    row.append(text + difference)
                else:  # the values of a column one under the other
                    padding = len(" (+0.0000)") if i > 0 else 0
                    row.append(text + difference.ljust(padding) + (" *" if i in best else "  "))
            table.append(row)
        return table

    def header(self) -> list[str]:
        return ["metric"] + [run.name for run in self.runs]

    def sources(self) -> list[str]:
        """One line per run: where its metrics come from."""
        return [f"{run.name}: {run.file}" + (f" (step {run.step})" if run.step is not None
                                              else "") for run in self.runs]

    def format_text(self) -> str:
        """A fixed-width table for the console; the best value of a row ends with '*'."""
        rows = [self.header()] + self.cells(markdown=False)
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                           for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                 for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join([f"split {self.split!r}; * best of a row; (+x) difference from "
                          f"{self.runs[0].name}"] + lines + self.sources())

    def format_markdown(self) -> str:
        """The same table in Markdown; the best value of a row in bold."""
        lines = [f"# Runs compared on `{self.split}`", "",
                 f"Best value of each row in **bold**; (+x) is the difference from "
                 f"`{self.runs[0].name}`. '-': not measured.", ""]
        lines.append("| " + " | ".join(self.header()) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * len(self.runs)) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.cells(markdown=True)]
        lines += ["", "Metrics read from:", ""] + [f"- {line}" for line in self.sources()]
        return "\n".join(lines) + "\n"


def _read_json(path: Path) -> dict[str, float]:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from e
    if not isinstance(results, dict) or not all(
            isinstance(v, (int, float)) for v in results.values()):
        raise UserError(f"{path}: not a metrics file (expected a JSON object of numbers, as "
                        f"fbnet train and fbnet eval write)")
    return results


def _splits(results: Mapping[str, float]) -> list[str]:
    return sorted({key.split("/")[0] for key in results if "/" in key})


def _eval_files(workdir: Path, split: str | None) -> list[tuple[int, str, Path]]:
    """(step, split, path) of `workdir/eval/*_step<N>.json`, of `split` when given."""
    found = []
    for path in sorted((workdir / "eval").glob("*_step*.json")):
        match = _EVAL_FILE.match(path.name)
        for found_split in match["splits"].split("+") if match else ():
            if split in (None, found_split):
                found.append((int(match["step"]), found_split, path))
    return found


def _recorded(workdir: Path, split: str | None, name: str) -> RunMetrics | None:
    """The latest evaluation (periodic or final) of `split` (any, when None) in the run's
    records; None when they hold none.

    Raises:
      UserError: that evaluation holds several splits and no `split` was given.
    """
    records, path = metrics_log.read(workdir)
    rounds = [r for r in records if r.kind in ("eval", "final")
              and (split is None or split in _splits(r.values))]
    if not rounds:
        return None
    latest = rounds[-1]  # of one step, the final evaluation comes after the periodic one
    splits = _splits(latest.values)
    if split is None and len(splits) > 1:
        raise UserError(f"{path}: the evaluation of step {latest.step} holds the splits "
                        f"{', '.join(splits)}; choose one with --split")
    return RunMetrics(name, workdir, path, split or splits[0], latest.step, latest.values)


def load_run(run_dir: str | Path, split: str | None = None, name: str | None = None
             ) -> RunMetrics:
    """The metrics of the run in `run_dir` on `split` (default: the split of its metrics.json).

    Raises:
      UserError: not a directory or not a run's, no metrics (of `split`), an unreadable or
        malformed metrics file, or metrics of several splits and no `split` given.
    """
    workdir = Path(run_dir)
    if not workdir.is_dir():
        raise UserError(f"{workdir}: no such directory")
    markers = (METRICS_FILE, metrics_log.FILE, "eval", "config.json", "checkpoints",
               logs.LOG_FILE)
    if not any((workdir / marker).exists() for marker in markers):
        raise UserError(f"{workdir} is not a run's work directory (it has none of "
                        f"{', '.join(markers)})")
    metrics_file = workdir / METRICS_FILE
    if metrics_file.is_file():
        results = _read_json(metrics_file)
        splits = _splits(results)
        if split is None and len(splits) > 1:
            raise UserError(f"{metrics_file} holds the splits {', '.join(splits)}; choose one "
                            f"with --split")
        if splits and (split is None or split in splits):
            step = results.get("step")
            return RunMetrics(name or workdir.name, workdir, metrics_file, split or splits[0],
                              None if step is None else int(step), results)
    evaluated = _eval_files(workdir, split)
    if not evaluated:
        recorded = _recorded(workdir, split, name or workdir.name)
        if recorded is not None:
            return recorded
        what = f"metrics of split {split!r}" if split else "metrics"
        raise UserError(f"{workdir} has no {what}: no {METRICS_FILE}"
                        f"{f' of that split' if split and metrics_file.is_file() else ''}, no "
                        f"eval/{split or '<split>'}_step<N>.json and no evaluation in "
                        f"{metrics_log.FILE}; evaluate the run with `fbnet eval --workdir "
                        f"{workdir}{f' --split {split}' if split else ''}`")
    step = max(s for s, _, _ in evaluated)
    latest = [(s, found_split, path) for s, found_split, path in evaluated if s == step]
    if len(latest) > 1:
        raise UserError(f"{workdir}/eval has step-{step} metrics of the splits "
                        f"{', '.join(x[1] for x in latest)}; choose one with --split")
    _, found_split, path = latest[0]
    return RunMetrics(name or workdir.name, workdir, path, found_split, step, _read_json(path))


def _names(run_dirs: Sequence[Path]) -> list[str]:
    """The shortest path tails that tell the runs apart (runs/a/seed0, runs/b/seed0 -> a/seed0,
    b/seed0)."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in run_dirs]  # the same directory twice


def compare(run_dirs: Sequence[str | Path], split: str | None = None, *,
            per_source: bool = False) -> Comparison:
    """The headline metrics of the runs in `run_dirs` on one split.

    Args:
      run_dirs: work directories of runs (`fbnet train --workdir`).
      split: the split compared (default: that of each run's metrics.json, which must agree).
      per_source: also each source's headline metrics, as rows "<source>/<metric>".

    Raises:
      UserError: no run given, a directory that is not a run or has no metrics, or runs whose
        default splits differ.
    """
    if not run_dirs:
        raise UserError("give the work directories of the runs to compare")
    runs = tuple(load_run(d, split, name) for d, name in zip(run_dirs, _names(
        [Path(d) for d in run_dirs])))
    splits = {run.split for run in runs}
    if len(splits) > 1:
        raise UserError("the runs' metrics are of different splits (" + ", ".join(
            f"{run.name}: {run.split}" for run in runs) + "); choose one with --split")
    split = runs[0].split
    prefixes = [""]
    if per_source:
        prefixes += sorted({f"{name}/" for run in runs
                            for name, _ in report.subsets(run.results, split)[1:]})
    rows = []
    for prefix in prefixes:
        for metric in COMPARED_METRICS:
            key = f"{split}/{prefix}{metric}"
            values = tuple(None if run.results.get(key) is None else float(run.results[key])
                           for run in runs)
            if any(v is not None for v in values):
                rows.append((prefix + metric, values))
    return Comparison(split, runs, tuple(rows))


def run_command(run_dirs: Sequence[str | Path], out: str | Path | None = None,
                split: str | None = None, *, per_source: bool = False) -> int:
    """`fbnet compare RUN_DIR... [--split S] [--out compare.md]`: logs the table, writes `out`.

    Returns:
      0.

    Raises:
      UserError: see `compare`; an --out that cannot be written.
    """
    comparison = compare(run_dirs, split, per_source=per_source)
    log.info("%s", comparison.format_text())
    if out:
        path = Path(out)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(comparison.format_markdown(), encoding="utf-8")
        except OSError as e:
            raise UserError(f"--out {out}: cannot write: {e.strerror or e}") from e
        log.info("comparison written to %s", path)
    return 0
