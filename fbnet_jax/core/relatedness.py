"""Expression-AU relatedness tables: Du et al.'s, or one read from a file, on a run's AU list.

`config.loss.relatedness` names the table: "du2014" for Du et al.'s published one
(`taxonomy.BASIC_RELATEDNESS`, see docs/design.md#relatedness-tables), or the path of a JSON
table that `fbnet relatedness` estimated from the training data (fbnet_jax/eval/relatedness.py
writes it and documents the file). `load` turns either into a `Relatedness` projected onto the
run's AU list; the coupling losses and compound expressions read it.

`load` sets a null entry of a file to 0: where the data says nothing, no relation is claimed
(Du et al.'s table likewise gives 0 to the AUs it does not list), and `Relatedness.source` says
how many entries that concerns.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from fbnet_jax.core import taxonomy
from fbnet_jax.core.errors import ConfigError

DU2014 = "du2014"
FORMAT = "fbnet_jax.relatedness"
VERSION = 1
FIELD = "loss.relatedness"   # the config field the loader's messages name


@dataclasses.dataclass(frozen=True, eq=False)   # eq=False: numpy fields have no truth value
class Relatedness:
    """An expression-AU relatedness table projected onto a run's AU list.

    Attributes:
      matrix: R, float32 [7, A], rows in `taxonomy.EXPRESSIONS` order, values in [0, 1].
      prototypical: P, bool [7, A]: the AUs that define each expression.
      aus: the columns, the AU list it was projected onto.
      source: one line saying where the numbers come from.
    """
    matrix: np.ndarray
    prototypical: np.ndarray
    aus: tuple[int, ...]
    source: str

    def __post_init__(self):
        shape = (len(taxonomy.EXPRESSIONS), len(self.aus))
        matrix = np.array(self.matrix, np.float32)
        prototypical = np.array(self.prototypical, bool)
        if matrix.shape != shape or prototypical.shape != shape:
            raise ValueError(f"relatedness matrix {matrix.shape} and prototypical mask "
                             f"{prototypical.shape} must both be {shape}")
        # Read-only: the losses close over these arrays as constants.
        matrix.setflags(write=False)
        prototypical.setflags(write=False)
        object.__setattr__(self, "matrix", matrix)
        object.__setattr__(self, "prototypical", prototypical)
        object.__setattr__(self, "aus", tuple(int(a) for a in self.aus))


def du2014(aus: Sequence[int]) -> Relatedness:
    """Du et al.'s basic table projected onto `aus` (Neutral row 0, AUs it omits 0)."""
    aus = tuple(int(a) for a in aus)
    return Relatedness(
        matrix=taxonomy.basic_relatedness(aus),
        prototypical=taxonomy.prototypical_mask(taxonomy.EXPRESSIONS, aus), aus=aus,
        source=f"{DU2014}: Du, Tao, Martinez, PNAS 2014, Table 1 "
               f"(fbnet_jax.core.taxonomy.BASIC_RELATEDNESS)")


def load(spec: str, aus: Sequence[int]) -> Relatedness:
    """The table `config.loss.relatedness` names, projected onto `aus` (columns in that order).

    Args:
      spec: "du2014", or the path of a table file written by `write` (`fbnet relatedness`).
      aus: the run's AU list (`config.data.aus`). AUs of the file outside it are dropped.

    Returns:
      The table. From a file, null entries are 0 and the source line counts them.

    Raises:
      ConfigError: naming `loss.relatedness` and the file: no such file, not JSON, not a table of
        this format and version, expressions other than `taxonomy.EXPRESSIONS` in order, AUs of
        `aus` the file has no column for, or values outside [0, 1] or not finite.
    """
    aus = tuple(int(a) for a in aus)
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"{FIELD}: expected {DU2014!r} or the path of a table written by "
                          f"`fbnet relatedness`, got {spec!r}")
    if spec == DU2014:
        return du2014(aus)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"{FIELD}: no such file {spec!r} (expected {DU2014!r} or the path of "
                          f"a table written by `fbnet relatedness`)")
    if not path.is_file():
        raise ConfigError(f"{FIELD}: {spec} is not a file")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{FIELD}: {spec} is not JSON: {e}") from e
    except OSError as e:
        raise ConfigError(f"{FIELD}: cannot read {spec}: {e.strerror or e}") from e

    def fail(what: str) -> NoReturn:
        raise ConfigError(f"{FIELD}: {spec}: {what}")

    if not isinstance(table, dict) or table.get("format") != FORMAT:
        got = table.get("format") if isinstance(table, dict) else type(table).__name__
        fail(f"not a relatedness table (\"format\" is {got!r}, expected {FORMAT!r})")
    if table.get("version") != VERSION:
        fail(f"table version {table.get('version')!r}; this fbnet_jax reads version {VERSION}")
    if table.get("expressions") != list(taxonomy.EXPRESSIONS):
        fail(f"\"expressions\" must be {list(taxonomy.EXPRESSIONS)}, in this order; got "
             f"{table.get('expressions')!r}")
    file_aus = table.get("aus")
    if (not isinstance(file_aus, list) or not all(_is_int(a) for a in file_aus)
            or len(set(file_aus)) != len(file_aus)):
        fail(f"\"aus\" must be a list of distinct AU numbers; got {file_aus!r}")
    missing = [a for a in aus if a not in file_aus]
    if missing:
        fail(f"no column for {_au_list(missing)} of data.aus (the table has "
             f"{_au_list(file_aus)})")
    shape = (len(taxonomy.EXPRESSIONS), len(file_aus))
    matrix, prototypical = table.get("matrix"), table.get("prototypical")
    if not _is_grid(matrix, shape, lambda v: v is None or _is_number(v)):
        fail(f"\"matrix\" must be {shape[0]} rows of {shape[1]} numbers or null (one per AU of "
             f"\"aus\")")
    if not _is_grid(prototypical, shape, lambda v: isinstance(v, bool)):
        fail(f"\"prototypical\" must be {shape[0]} rows of {shape[1]} booleans (one per AU of "
             f"\"aus\")")
    # Python's json reads NaN and Infinity; NaN fails both comparisons, so it is refused too.
    bad = [f"{taxonomy.EXPRESSIONS[e]}/AU{file_aus[i]} = {v}"
           for e, row in enumerate(matrix) for i, v in enumerate(row)
           if v is not None and not 0 <= v <= 1]
    if bad:
        fail(f"values must lie in [0, 1]: {', '.join(bad)}")

    columns = [file_aus.index(a) for a in aus]
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix],
                      np.float64)[:, columns]
    unestimated = int(np.isnan(values).sum())
    description = table.get("description") or "no description"
    source = f"{spec}: {description}"
    if unestimated:
        source += f"; {unestimated} entries without data set to 0"
    return Relatedness(matrix=np.nan_to_num(values, nan=0.0),
                       prototypical=np.array(prototypical, bool)[:, columns], aus=aus,
                       source=source)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_grid(value: Any, shape: tuple[int, int], ok) -> bool:
    return (isinstance(value, list) and len(value) == shape[0]
            and all(isinstance(row, list) and len(row) == shape[1] and all(ok(v) for v in row)
                    for row in value))


def _au_list(aus: Sequence[int]) -> str:
    return ", ".join(f"AU{a}" for a in aus) or "no AU"
