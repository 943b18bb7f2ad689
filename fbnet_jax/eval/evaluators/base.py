"""What every kind of evaluator shares: the `Kind` a kind module defines, the config entry's
common fields (`entry`), the predict function's type and the check that a split exists.

The kind modules import this module and never the package, whose `__init__` imports them to
build its registry (`fbnet_jax.eval.evaluators.KINDS`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

# The fields of every evaluator, in entry order (a kind's own fields follow: `Kind.fields`).
COMMON_FIELDS = ("kind", "split", "sources", "every", "final")

# predict(split, sources, output keys) -> (outputs, labels), numpy, rows aligned.
PredictFn = Callable[[str, tuple[str, ...], tuple[str, ...]],
                     tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]


def entry(kind: str, split: str, sources: Sequence[str], every: int, final: bool,
          **options) -> ml_collections.ConfigDict:
    """A config entry of `config.evals`: the common fields, then the kind's own (`options`)."""
    return ml_collections.ConfigDict(dict(
        kind=kind,                 # a name of fbnet_jax.eval.evaluators.KINDS
        split=split,               # the split it reads
        sources=tuple(sources),    # names in data.sources; () = the sources trained on
                                   # (weight > 0): name evaluation-only sources explicitly
        every=int(every),          # steps between runs during training; 0 = not periodic
        final=bool(final),         # runs after the last step (metrics.json, report) and is
                                   # what `fbnet eval` runs by default
        **options))


class Kind(abc.ABC):
    """A kind of evaluator: what its entries hold, what it reads, computes and checks.

    A kind module defines one subclass and its single instance, and the function that builds its
    config entries (with `entry`). `options` below are an evaluator's values of `fields`.

    Attributes:
      name: its `kind` in config entries, and its key in the registry.
      fields: its own fields of a config entry, with their defaults, in entry order.
      outputs: the model outputs it reads.
    """
    name: str
    fields: Mapping[str, Any]
    outputs: tuple[str, ...]

    def splits(self, split: str, options: Mapping[str, Any]) -> tuple[str, ...]:
        """Every split an evaluator of `split` reads, its own first."""
        del options
        return (split,)

    def on_split(self, split: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options of the same evaluation of another split (`fbnet eval --split`)."""
        del split
        return dict(options)

    @abc.abstractmethod
    def run(self, predict: PredictFn, split: str, sources: tuple[str, ...],
            options: Mapping[str, Any], source_names: Sequence[str],
            aus: Sequence[int]) -> dict[str, float]:
        """The flat metrics of an evaluator of `split` and `sources` (`Evaluator.__call__`)."""

    @abc.abstractmethod
    def metric_names(self, split: str, sources: tuple[str, ...], options: Mapping[str, Any],
                     aus: Sequence[int]) -> tuple[str, ...]:
        """Every key `run` can return, sorted."""

    def problems(self, path: str, entry: ml_collections.ConfigDict, chosen: Sequence[str],
                 splits: Mapping[str, set[str]]) -> list[str]:
        """What is wrong with its own fields of a config entry at `path`, whose common fields
        are right; `chosen`: the sources it reads that have splits, `splits`: their splits."""
        del path, entry, chosen, splits
        return []


def split_problems(path: str, field: str, split: str, chosen: Sequence[str],
                   splits: Mapping[str, set[str]]) -> list[str]:
    """The message when a source of `chosen` lacks the split that `{path}.{field}` names."""
    lacking = [s for s in chosen if split not in splits[s]]
    if not lacking:
        return []
    common = set.intersection(*(set(splits[s]) for s in chosen)) - {"train"}
    return [f"{path}.{field}: {split!r} is not a split of {', '.join(lacking)} "
            f"(splits of every source it reads: {', '.join(sorted(common)) or 'none'})"]
