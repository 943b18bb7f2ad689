"""The run's metrics as data: `metrics.jsonl` in the work directory, one JSON object a line.

Process 0 of `fbnet train` appends a record when an invocation starts, at every logged step and
after every evaluation round, and flushes it at once: a run killed at any point (even with
SIGKILL) keeps every record written before. The report's training curves and `fbnet compare` read
these records, never `train.log`, which is for people (fbnet_jax/core/logs.py).

A record (docs/design.md#the-runs-records-metricsjsonl):

    {"kind": "train", "step": 200, "time": 1767261600.123, "values": {"loss/total": 3.5, ...}}

- `kind`: "start" (an invocation began at `step`: 0, or the checkpoint it resumed from; no
  values), "train" (a logged step: the means since the previous one of `loss/<term>` and
  `grad_norm`, with `skipped_steps`, `data/fraction/<source>`, `learning_rate`,
  `steps_per_second` and `examples_per_second`, the scalars TensorBoard gets), "eval" (a periodic
  evaluation round: the flat metric keys of metrics.json) or "final" (the final evaluation: what
  metrics.json holds, "step" included);
- `step`: the optimizer step; `time`: wall-clock seconds since the epoch;
- `values`: JSON numbers, except NaN and the infinities, which JSON has no numbers for: they are
  the strings "nan", "inf" and "-inf".

Restarts. The records of the steps after a run's latest checkpoint are done again by the next
invocation, so when a `Writer` opens for a run restored from step s it first drops the records
after s (and a record cut short by a kill); a run starting without a checkpoint starts the file
afresh. The file then never holds two records of one step and kind but in one case: a final
evaluation done again because the run stopped before writing metrics.json. `read` keeps the last
record of each (kind, step).

Runs from before this file have only `train.log`: `read` then parses it (and logs that it does),
and a `Writer` opening such a run for a restart writes what it parses into `metrics.jsonl` once,
so the records of the invocations before it are not lost. The log gives what its lines show:
"start" records from the resume lines, "train" records with the losses, learning rate and rates,
rounded as printed, and "eval" records with the headline metrics of each split; no "final" ones.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

from fbnet_jax.core import logs

log = logging.getLogger(__name__)

FILE = "metrics.jsonl"
KINDS = ("start", "train", "eval", "final")
# JSON has no NaN or infinity; these strings stand for them (str() of the float).
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@dataclasses.dataclass(frozen=True)
class Record:
    """One line of `metrics.jsonl`."""
    kind: str
    step: int
    time: float
    values: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def to_line(self) -> str:
        """The record as one line of strict JSON (no newline)."""
        values = {name: value if math.isfinite(value) else str(value)
                  for name, value in ((name, float(v)) for name, v in self.values.items())}
        return json.dumps({"kind": self.kind, "step": self.step, "time": self.time,
                           "values": values}, allow_nan=False)

    @classmethod
    def from_line(cls, line: str) -> Record:
        """Parses `to_line`'s output.

        Raises:
          ValueError: the line is not a record.
        """
        data = json.loads(line)
        if not isinstance(data, dict) or data.get("kind") not in KINDS or not isinstance(
                data.get("step"), int) or not isinstance(data.get("time"), (int, float)) \
                or not isinstance(data.get("values"), dict):
            raise ValueError(f"not a record: {line[:80]!r}")
        values = {}
        for name, value in data["values"].items():
            if isinstance(value, str) and value in _NON_FINITE:
                value = _NON_FINITE[value]
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"not a number: {name} = {value!r}")
            values[name] = float(value)
        return cls(data["kind"], data["step"], float(data["time"]), values)


def _continues(record: Record, restored_step: int | None) -> bool:
    """Whether a run restarting from the checkpoint of `restored_step` (None: without one) keeps
    `record`: only those up to that step, whose steps it does not do again."""
    return restored_step is not None and record.step <= restored_step


def _parse(path: Path) -> tuple[list[tuple[Record, str]], int]:
    """(record, line) of each record of the file `path`, and the number of lines that are none
    (one cut short by a kill, say)."""
    parsed, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            parsed.append((Record.from_line(line), line))
        except ValueError:
            bad += 1
    return parsed, bad


class Writer:
    """Appends the records of one invocation of a run to `workdir/metrics.jsonl` (process 0).

    Opening it applies the restart rule (see the module's docstring), migrating `train.log`
    first when the run has no metrics.jsonl yet, then appends the "start" record.

    Args:
      workdir: the run's work directory (it exists).
      restored_step: the step of the checkpoint this invocation continues; None for none.
    """

    def __init__(self, workdir: str | Path, restored_step: int | None):
        self.path = Path(workdir) / FILE
        old_log = self.path.parent / logs.LOG_FILE
        if self.path.exists():
            parsed, bad = _parse(self.path)
            # Ended by a newline: appended records must start lines of their own.
            kept = [line.rstrip("\n") + "\n" for record, line in parsed
                    if _continues(record, restored_step)]
            if bad or kept != [line for _, line in parsed]:
                self._replace(kept)
        elif restored_step is not None and old_log.is_file():
            kept = [record for record in read_train_log(old_log)
                    if _continues(record, restored_step)]
            self._replace([record.to_line() + "\n" for record in kept])
            log.info("%s: %d records of the invocations before this one read from %s, which "
                     "they wrote before runs had %s", self.path, len(kept), old_log, FILE)
        self._file = self.path.open("a", encoding="utf-8")
        self.write("start", restored_step or 0, {})

    def _replace(self, lines: list[str]) -> None:
        """Makes `lines` the file's content, atomically: a kill leaves the old or the new one."""
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(lines), encoding="utf-8")
        os.replace(temporary, self.path)

    def write(self, kind: str, step: int, values: Mapping[str, float]) -> None:
        """Appends a record stamped now and flushes it to the operating system."""
        self._file.write(Record(kind, int(step), round(time.time(), 3), values).to_line() + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read(workdir: str | Path) -> tuple[list[Record], Path | None]:
    """The records of the run in `workdir`, ascending by step, and the file they come from.

    From `metrics.jsonl`; for a run from before it, from its `train.log` (logged). The last
    record of each (kind, step) is kept; of one step, records keep the order they were written.

    Returns:
      (records, path), path None when the run has neither file (records then empty).
    """
    workdir = Path(workdir)
    path = workdir / FILE
    if path.is_file():
        parsed, bad = _parse(path)
        if bad:
            log.warning("%s: %d line(s) that are no record skipped", path, bad)
        records = [record for record, _ in parsed]
    elif (workdir / logs.LOG_FILE).is_file():
        path = workdir / logs.LOG_FILE
        log.info("%s has no %s (a run from before it): reading its records from %s", workdir,
                 FILE, path)
        records = read_train_log(path)
    else:
        return [], None
    latest: dict[tuple[str, int], Record] = {}
    for record in records:
        latest.pop((record.kind, record.step), None)  # the later one takes the later place
        latest[(record.kind, record.step)] = record
    return sorted(latest.values(), key=lambda record: record.step), path


# ---------------------------------------------------------------------------------------------
# train.log, as the versions before metrics.jsonl wrote it (fbnet_jax/core/logs.py, train.py).

_LOG_LINE = re.compile(r"^(?P<stamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (?P<message>.*)$")
# The two lines that say where an invocation starts.
_FRESH = re.compile(r"^no checkpoint in .*: starting at step 0$")
_RESUMED = re.compile(r"^resumed from the checkpoint of step (?P<step>\d+)$")
# The progress line; the loss terms are "name value" pairs.
_PROGRESS = re.compile(r"^step\s+(?P<step>\d+)/\d+ .*\| (?P<rate>\S+) steps/s (?P<examples>\S+) "
                       r"ex/s \| .*\| loss (?P<loss>\S+) \|(?P<terms>[^|]*)\| lr (?P<lr>\S+)$")
_NUMBER = r"-?(?:\d+(?:\.\d*)?(?:e[-+]?\d+)?|nan|inf)"
_PAIR = re.compile(rf"^(?P<name>[A-Za-z][\w ]*?) (?P<value>{_NUMBER})$")
# The one-line evaluation summary: "<split>: <header> <value>, ...".
_SUMMARY = re.compile(r"^(?P<split>[\w.-]+): (?P<pairs>.+)$")
# The summary's headers and the metric keys they stand for, as those versions printed them (the
# headline metrics of fbnet_jax/eval/report.py then). Kept here as written: old logs do not change
# when today's labels do.
_SUMMARY_KEYS = {
    "expr acc": "expression_accuracy", "expr F1": "expression_macro_f1",
    "AU F1": "au_mean_f1", "AU acc": "au_accuracy",
    "CCC V": "va_ccc_valence", "CCC A": "va_ccc_arousal", "CCC mean": "va_mean_ccc",
}


def read_train_log(path: str | Path) -> list[Record]:
    """The records a `train.log` holds, with the restart rule applied at each resume line.

    An evaluation summary belongs to the step of the progress line before it (the loop logs the
    step it evaluates first); the summaries of one round make one "eval" record.
    """
    records: list[Record] = []
    step = None
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        match = _LOG_LINE.match(line)
        if not match:
            continue
        when = time.mktime(time.strptime(match["stamp"], "%Y-%m-%d %H:%M:%S"))
        message = match["message"]
        resumed = _RESUMED.match(message)
        if resumed or _FRESH.match(message):
            restored = int(resumed["step"]) if resumed else None
            records = [record for record in records if _continues(record, restored)]
            step = restored or 0
            records.append(Record("start", step, when))
            continue
        progress = _PROGRESS.match(message)
        if progress:
            terms = progress["terms"].split()
            if len(terms) % 2:
                continue  # not a line this package wrote
            step = int(progress["step"])
            values = {"loss/total": progress["loss"]}
            values.update({f"loss/{name}": value for name, value in zip(terms[::2], terms[1::2])})
            values.update(learning_rate=progress["lr"], steps_per_second=progress["rate"],
                          examples_per_second=progress["examples"])
            records.append(Record("train", step, when,
                                  {name: float(value) for name, value in values.items()}))
            continue
        summary = _SUMMARY.match(message)
        if summary and step is not None:
            pairs = [_PAIR.match(p) for p in summary["pairs"].split(", ")]
            if not all(pairs):
                continue
            values = {f"{summary['split']}/{_SUMMARY_KEYS.get(p['name'], p['name'])}":
                      float(p["value"]) for p in pairs}
            last = records[-1] if records else None
            if last is not None and last.kind == "eval" and last.step == step:
                records[-1] = dataclasses.replace(last, values={**last.values, **values})
            else:
                records.append(Record("eval", step, when, values))
    return records
