"""`fbnet relatedness`: an expression-AU relatedness table estimated from the training data.

R[e, i] = P(AU i active | expression e), counted on the training splits of a config's sources.
`estimate`, `write` and `format_table` are the pieces of the command (`run_command`); the
coupling losses read a written table through `config.loss.relatedness`
(`fbnet_jax.core.relatedness.load`, which also gives Du et al.'s published table).

The table file (`write`; `fbnet_jax.core.relatedness.load` reads version 1):

  {"format": "fbnet_jax.relatedness", "version": 1,
   "description": "<where the numbers come from>",
   "expressions": ["Neutral", ..., "Surprise"],      taxonomy.EXPRESSIONS, in that order
   "aus": [1, 2, ...],                               the columns
   "min_count": 20,
   "matrix": [[0.05, null, ...], ...],               7 rows of len(aus) numbers in [0, 1], null
                                                     where fewer than min_count examples had
                                                     the expression and that AU labelled
   "prototypical": [[false, true, ...], ...],        7 rows of len(aus) booleans
   "counts": [[285, 0, ...], ...],                   the examples behind each entry
   "expression_counts": [285, ...],                  examples of each expression with an AU label
   "sources": {"affwild2_like": 2000}}               examples used per source
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import tqdm

from data_pipelines import pipeline
from data_pipelines import schema
from fbnet_jax.core import taxonomy
from fbnet_jax.core.relatedness import FIELD, FORMAT, VERSION, Relatedness, du2014
from fbnet_jax.core.errors import ConfigError, UserError


# An estimated entry is marked prototypical at or above this rate. Du et al. call prototypical
# the AUs that (nearly) every subject showed, and the observational AUs of their basic table stay
# at or below 0.67; the synthetic generator shows prototypical AUs at 0.93
# (`data_pipelines.synthetic.PROTOTYPICAL_RATE`). 0.8 lies between the two with room for sampling
# error: an estimate from n examples has a standard error of about sqrt(0.93 * 0.07 / n), 0.06 at
# n = 20, and frames of one video clip are not independent examples (on the demo's data, 4 of 15
# prototypical entries came out at 0.88-0.89, below an earlier mark of 0.9).
PROTOTYPICAL_MIN_RATE = 0.8
DEFAULT_MIN_COUNT = 20   # fewer labelled examples than this leave an entry unestimated (null)
DECIMALS = 4             # estimates are written rounded: far below their sampling error

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Estimate:
    """P(AU active | expression) counted on the training data (`estimate`).

    Attributes:
      aus: the columns (`config.data.aus`).
      counts: n, int64 [7, A]: examples with expression e whose AU i is labelled.
      active: k, int64 [7, A]: of those, the examples with AU i active.
      expression_counts: int64 [7]: examples of each expression with at least one AU labelled.
      sources: examples used (labelled with an expression and at least one AU) per source that
        had any, in source order.
      unused: the other sources, each with the reason it gave nothing.
      min_count: entries with n < min_count count as unestimated.
      description: one line saying what was counted.
    """
    aus: tuple[int, ...]
    counts: np.ndarray
    active: np.ndarray
    expression_counts: np.ndarray
    sources: dict[str, int]
    unused: dict[str, str]
    min_count: int
    description: str

    @property
    def matrix(self) -> np.ndarray:
        """k / n, float64 [7, A]; NaN where n == 0."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.active / self.counts, np.nan)

    @property
    def estimated(self) -> np.ndarray:
        """bool [7, A]: the entries with at least `min_count` examples."""
        return self.counts >= self.min_count

    @property
    def prototypical(self) -> np.ndarray:
        """bool [7, A]: estimated entries at or above PROTOTYPICAL_MIN_RATE."""
        return self.estimated & (np.nan_to_num(self.matrix) >= PROTOTYPICAL_MIN_RATE)


# --------------------------------------------------------------------------------------------
# Estimation.


def _declared_labels(source_config: ml_collections.ConfigDict,
                     aus: Sequence[int]) -> tuple[bool, bool] | None:
    """(labels basic expressions, labels some AU of `aus`) of a source's train split, when its
    config says so without reading it (synthetic sources); None for kinds that must be read.

    Reading a synthetic record renders its face, so a source that cannot contribute is skipped
    on its config alone (its train split publishes what `synthetic.SyntheticSpec` says).
    """
    if source_config.kind != "synthetic":
        return None
    spec = source_config.synthetic
    expressions = bool(spec.label_expression) and not spec.compound  # compound: no basic class
    au = spec.label_aus is None or bool(set(int(a) for a in spec.label_aus) & set(aus))
    return expressions, au


def _what(expressions: bool, aus: bool) -> str:
    if expressions == aus:
        return "labels both" if expressions else "labels neither expressions nor AUs"
    return "labels expressions and no AU" if expressions else "labels AUs and no expression"


def read_indices(size: int, max_examples: int | None) -> np.ndarray:
    """The indices read of a source of `size` examples: all, or `max_examples` evenly spread.

    Spread rather than the first ones: in a video source consecutive records are frames of one
    clip with the same labels, and the first N would be a few clips.
    """
    if max_examples is None or size <= max_examples:
        return np.arange(size)
    return (np.arange(max_examples) * size) // max_examples


def estimate(config: ml_collections.ConfigDict, *, min_count: int = DEFAULT_MIN_COUNT,
             max_examples: int | None = None) -> Estimate:
    """Counts P(AU i active | expression e) on the training splits of the config's sources.

    Every source with a non-zero weight (the data `fbnet train` draws from) is read directly, one
    record at a time, without batching or augmentation; an example counts when it carries an
    expression label, and it adds to n[e, i] for each AU i it labels, and to k[e, i] when that
    AU is active. Synthetic sources whose config publishes no expression or no AU of
    `config.data.aus` are skipped unread.

    Counts are examples, not independent faces: the frames of a video clip share their labels,
    so a video source's estimates vary more than n suggests.

    Args:
      config: the experiment config (`data.aus`, `data.sources` and `name` are read).
      min_count: entries with fewer labelled examples count as unestimated (>= 1).
      max_examples: read at most this many examples per source, evenly spread over it
        (`read_indices`); None reads all.

    Returns:
      The counts.

    Raises:
      ConfigError: `config.data` is invalid (its AU list or its sources).
      UserError: no source labels an expression and an AU on the same example; the message
        names each source and what it labels.
      ValueError: `min_count` or `max_examples` below 1, or a record with an expression outside
        0..6 or an AU vector of another length than the AU list.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    data = config.data
    try:
        aus = taxonomy.check_au_list(data.aus)
    except ValueError as e:
        raise ConfigError(f"data.aus: {e}") from e
    problems = pipeline.config_problems(data)
    if problems:
        raise ConfigError(problems)

    shape = (len(taxonomy.EXPRESSIONS), len(aus))
    counts, active = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    expression_counts = np.zeros(shape[0], np.int64)
    used: dict[str, int] = {}
    unused: dict[str, str] = {}   # per source that gave nothing: why
    for k, name in enumerate(pipeline.source_names(data)):
        source_config = data.sources[name]
        if float(source_config.weight) == 0:
            unused[name] = "has weight 0 (not trained on)"
            continue
        declared = _declared_labels(source_config, aus)
        if declared is not None and not all(declared):
            unused[name] = _what(*declared)
            continue
        source = pipeline.build_source(name, source_config, split="train", aus=aus,
                                       source_index=k)
        indices = read_indices(len(source), max_examples)
        # Dataset sources can give a record's labels without reading its image.
        read = getattr(source, "labels", None) or source.__getitem__
        with_expression = with_au = both = 0
        for index in tqdm.tqdm(indices, desc=f"reading {name}", unit="ex", leave=False,
                               disable=None):
            record = read(int(index))
            expression = int(record[schema.EXPRESSION])
            au = np.asarray(record[schema.AU])
            if au.shape != (len(aus),):
                raise ValueError(f"record {record[schema.KEY]!r} of source {name!r}: au has "
                                 f"shape {au.shape}, expected ({len(aus)},) for data.aus")
            labelled = au >= 0
            with_au += bool(labelled.any())
            if expression == schema.MISSING_EXPRESSION:
                continue
            if not 0 <= expression < shape[0]:
                raise ValueError(f"record {record[schema.KEY]!r} of source {name!r}: "
                                 f"expression {expression} outside 0..{shape[0] - 1}")
            with_expression += 1
            if not labelled.any():
                continue
            both += 1
            expression_counts[expression] += 1
            counts[expression] += labelled
            active[expression] += labelled & (au > 0)
        if both:
            used[name] = both
        else:
            unused[name] = (f"labels both on none of the {len(indices)} examples read "
                            f"({with_expression} with an expression, {with_au} with AUs)")
    if not used:
        raise UserError("no training source labels an expression and AUs on the same examples, "
                        "so there is nothing to estimate P(AU | expression) from: "
                        + "; ".join(f"{n} {why}" for n, why in unused.items()))
    limit = f", at most {max_examples} per source" if max_examples is not None else ""
    description = (f"P(AU active | expression) counted on the training split of config "
                   f"{config.get('name', '?')!r}: "
                   + ", ".join(f"{n} ({c} examples)" for n, c in used.items()) + limit)
    return Estimate(aus=aus, counts=counts, active=active, expression_counts=expression_counts,
                    sources=used, unused=unused, min_count=int(min_count),
                    description=description)


# --------------------------------------------------------------------------------------------
# Writing and showing.


def to_json(est: Estimate) -> dict[str, Any]:
    """The table file's content (see the module docstring)."""
    matrix = est.matrix
    return {
        "format": FORMAT,
        "version": VERSION,
        "description": est.description,
        "expressions": list(taxonomy.EXPRESSIONS),
        "aus": list(est.aus),
        "min_count": est.min_count,
        "matrix": [[round(float(v), DECIMALS) if ok else None for v, ok in zip(row, ok_row)]
                   for row, ok_row in zip(matrix, est.estimated)],
        "prototypical": est.prototypical.tolist(),
        "counts": est.counts.tolist(),
        "expression_counts": est.expression_counts.tolist(),
        "sources": dict(est.sources),
    }


def write(est: Estimate, path: str | os.PathLike) -> Path:
    """Writes the table file: one matrix row per line, atomically (a temporary file renamed).

    Returns:
      The path written.

    Raises:
      OSError: the file cannot be written.
    """
    path = Path(path)
    content = to_json(est)
    lines = []
    for key, value in content.items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            rows = ",\n".join(f"    {json.dumps(row)}" for row in value)
            lines.append(f"  {json.dumps(key)}: [\n{rows}\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


_NAME_WIDTH = max(len(name) for name in taxonomy.EXPRESSIONS) + 1   # "Happiness "


def _cell(value: float, prototypical: bool, estimated: bool = True) -> str:
    """Five characters: "0.93*" (prototypical), "0.05 ", or "  -  " (unestimated)."""
    if not estimated:
        return "  -  "
    return f"{value:4.2f}{'*' if prototypical else ' '}"


def format_table(est: Estimate, reference: Relatedness) -> str:
    """The estimate beside a reference table, readable in a 100-column terminal.

    Two lines per expression: the estimate ("est", with the expression's example count under
    its name) and the reference ("ref"). Cells are five characters: the value with 2 decimals
    and `*` after a prototypical entry, "  -  " for an entry estimated from fewer than
    `min_count` examples. A legend comes first, the largest differences last.

    Raises:
      ValueError: the reference has other AU columns than the estimate.
    """
    if tuple(reference.aus) != tuple(est.aus):
        raise ValueError(f"the reference's AUs {list(reference.aus)} are not the estimate's "
                         f"{list(est.aus)}")
    matrix, estimated, prototypical = est.matrix, est.estimated, est.prototypical
    lines = [
        "est: P(AU active | expression) counted on the training data, from n examples of the "
        "expression;",
        f"ref: {reference.source.split(':', 1)[0]}; *: prototypical (est: >= "
        f"{PROTOTYPICAL_MIN_RATE}); -: fewer than {est.min_count} labelled examples",
        f"{'AU':<{_NAME_WIDTH}}    " + "".join(f"{a:>4} " for a in est.aus).rstrip(),
    ]
    for e, name in enumerate(taxonomy.EXPRESSIONS):
        cells = "".join(_cell(v, p, ok) for v, p, ok in
                        zip(matrix[e], prototypical[e], estimated[e]))
        lines.append(f"{name:<{_NAME_WIDTH}}est {cells}".rstrip())
        ref = "".join(_cell(v, p) for v, p in zip(reference.matrix[e], reference.prototypical[e]))
        count = f"n={est.expression_counts[e]}"
        lines.append(f"{count:<{_NAME_WIDTH}}ref {ref}".rstrip())
    difference = np.where(estimated, np.abs(np.nan_to_num(matrix) - reference.matrix), -1.0)
    order = np.argsort(difference, axis=None, kind="stable")[::-1][:3]
    largest = [f"{taxonomy.EXPRESSIONS[e]} AU{est.aus[i]} {matrix[e, i]:.2f} vs "
               f"{reference.matrix[e, i]:.2f}"
               for e, i in zip(*np.unravel_index(order, difference.shape))
               if difference[e, i] >= 0]
    if largest:
        lines.append(f"largest differences: {'; '.join(largest)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The command.


def _check_out(out: str | None) -> Path:
    """Refuses an --out that cannot be written before anything is read."""
    if not out:
        raise UserError("fbnet relatedness needs --out FILE (the JSON table to write)")
    path = Path(out).expanduser()
    if path.is_dir():
        raise UserError(f"--out {out}: is a directory; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"--out {out}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists()
                                                    and not os.access(path, os.W_OK)):
        raise UserError(f"--out {out}: not writable")
    return path


def run_command(config: ml_collections.ConfigDict, out: str | None, *,
                min_count: int = DEFAULT_MIN_COUNT, max_examples: int | None = None) -> Estimate:
    """`fbnet relatedness`: estimates the table, logs it beside Du et al.'s, writes `out`.

    Raises:
      UserError: an --out that cannot be written, a bad --min_count or --max_examples, a data
        config that is invalid or in which no source labels both tasks.
    """
    path = _check_out(out)
    for flag, value in (("min_count", min_count), ("max_examples", max_examples)):
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")
    result = estimate(config, min_count=min_count, max_examples=max_examples)
    reference = du2014(result.aus)
    for name, why in result.unused.items():
        log.info("not used: %s %s", name, why)
    log.info("%s\n%s", result.description, format_table(result, reference))
    try:
        write(result, path)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write: {e.strerror or e}") from e
    unestimated = int((~result.estimated).sum())
    log.info("wrote %s (%d of %d entries estimated); train with it: "
             "--config.%s=%s", path, result.estimated.size - unestimated, result.estimated.size,
             FIELD, path)
    return result
