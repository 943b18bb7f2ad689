"""Evaluators: the evaluations a config describes (`config.evals`), one contract for all.

An experiment's `config.evals` is a dict of named evaluators. Each names its kind, the split and
sources it reads (`()`: the sources trained on, weight > 0; an evaluation-only source of weight
0 is read only by the evaluators that name it), how often it runs during training (`every`
steps; 0: never periodically) and whether it is part of the final evaluation (`final`: after the
last step, into `metrics.json` and the report, and what `fbnet eval` runs by default):

  config.evals.validation = evaluators.tasks("validation", every=500)
  config.evals.test = evaluators.tasks("test", final=True, au_thresholds_from="validation")
  config.evals.compound_zero_shot = evaluators.compound_zero_shot(
      "test", sources=("rafdb_compound",))

Kinds (`KINDS`), each in its module, which owns its fields, config-entry constructor, outputs,
run, metric names and field checks:
  tasks               kind_tasks.py: every metric of docs/design.md#metrics (expressions, AUs,
                      VA) per source and for the evaluator's sources together;
                      `au_thresholds_from` names a split of the same sources to tune per-AU
                      thresholds on (`au_tuned_*` keys).
  compound_zero_shot  kind_compound.py: RAF-DB's 11 compound classes from the network's AU and
                      expression probabilities (fbnet_jax/eval/compound.py).
  compound_few_shot   kind_compound.py: k-shot linear probe and nearest class mean on the
                      features, for each k of `ks`, over `draws` random support sets.
A new kind is a module defining a `base.Kind` and its constructor, its line in `KINDS` and the
import of its constructor below. This module owns what is common: the `Evaluator`, building
them from a config (`from_config`), choosing (`select`) and running them (`run`), and the checks
of `config.evals` (`problems`) but for a kind's own fields.

The contract (after big_vision's evaluators): an `Evaluator` is called with a predict function
`predict(split, sources, output_keys) -> (outputs, labels)`, the model's outputs and the labels
of every example of those sources' split (numpy, rows aligned, `labels["valid"]` 0 on padding),
and returns flat metrics `{split}/{metric}` (the evaluator's sources together, tasks only) and
`{split}/{source}/{task}_{metric}`. Training and `fbnet eval` build the predict function (one
pass over each split, however many evaluators read it: fbnet_jax/eval/evaluate.py); a test can
pass one that returns fixed arrays.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from data_pipelines import pipeline
from fbnet_jax.eval.evaluators import base, kind_compound, kind_tasks
from fbnet_jax.eval.evaluators.base import COMMON_FIELDS, PredictFn
from fbnet_jax.eval.evaluators.kind_compound import compound_few_shot, compound_zero_shot
from fbnet_jax.eval.evaluators.kind_tasks import TASK_OUTPUTS, tasks

__all__ = ["COMMON_FIELDS", "KINDS", "TASK_OUTPUTS", "Evaluator", "PredictFn",
           "compound_few_shot", "compound_zero_shot", "from_config", "problems", "run", "select",
           "tasks", "trained_sources"]

# Every kind, by name, in the order messages list them.
KINDS: dict[str, base.Kind] = {kind.name: kind for kind in (
    kind_tasks.KIND,
    kind_compound.ZERO_SHOT,
    kind_compound.FEW_SHOT,
)}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


# ---------------------------------------------------------------------------------------------
# Evaluators.

@dataclasses.dataclass(frozen=True)
class Evaluator:
    """One configured evaluation; call it with a predict function to get its metrics.

    Attributes:
      name: its key in `config.evals`.
      kind: one of KINDS.
      split: the split it scores.
      sources: the sources it reads (never empty: `()` in the config is every source of
        weight > 0, the ones trained on).
      every: steps between runs during training (0: not periodic).
      final: part of the final evaluation.
      options: the kind's own fields (`KINDS[kind].fields`).
    """
    name: str
    kind: str
    split: str
    sources: tuple[str, ...]
    every: int
    final: bool
    options: Mapping[str, Any]

    @property
    def outputs(self) -> tuple[str, ...]:
        """The model outputs it reads."""
        return KINDS[self.kind].outputs

    @property
    def splits(self) -> tuple[str, ...]:
        """Every split it reads: its own, and those its kind reads besides (a tasks evaluator's
        AU-threshold split)."""
        return KINDS[self.kind].splits(self.split, self.options)

    def runs_at(self, step: int, num_steps: int) -> bool:
        """Whether it runs after training step `step` (the final evaluation is separate)."""
        return bool(self.every) and step % self.every == 0 and step < num_steps

    def on_split(self, split: str) -> Evaluator:
        """The same evaluation of another split (`fbnet eval --split`). Thresholds are not tuned
        on the split being scored: that would flatter it."""
        return dataclasses.replace(self, split=split,
                                   options=KINDS[self.kind].on_split(split, self.options))

    def __call__(self, predict: PredictFn, source_names: Sequence[str],
                 aus: Sequence[int]) -> dict[str, float]:
        """The flat metrics of this evaluation.

        Args:
          predict: `predict(split, sources, output_keys) -> (outputs, labels)`.
          source_names: every source of the config in source-index order (labels["source"]).
          aus: the AU numbers of the "au_logits" columns.
        """
        return KINDS[self.kind].run(predict, self.split, self.sources, self.options,
                                    source_names, aus)

    def metric_names(self, aus: Sequence[int]) -> tuple[str, ...]:
        """Every key it can return (a real split returns those its labels allow)."""
        return KINDS[self.kind].metric_names(self.split, self.sources, self.options, aus)


def trained_sources(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The sources of weight > 0, in source-index order: what `sources = ()` stands for."""
    return tuple(n for n in pipeline.source_names(data_config)
                 if float(data_config.sources[n].weight) > 0)


def from_config(config: ml_collections.ConfigDict) -> list[Evaluator]:
    """The evaluators of `config.evals`, in name order (the config must be valid: `problems`)."""
    trained = trained_sources(config.data)
    out = []
    for name in sorted(config.evals.keys()):
        entry = config.evals[name]
        options = {field: entry[field] for field in KINDS[entry.kind].fields}
        out.append(Evaluator(name=name, kind=entry.kind, split=entry.split,
                             sources=tuple(entry.sources) or trained, every=int(entry.every),
                             final=bool(entry.final), options=options))
    return out


def select(evaluators: Sequence[Evaluator], names: Sequence[str] | None) -> list[Evaluator]:
    """The evaluators named (default: the final ones), in the order given.

    Raises:
      ValueError: an unknown name, or no final evaluator when no name is given.
    """
    by_name = {e.name: e for e in evaluators}
    if names is None:
        chosen = [e for e in evaluators if e.final]
        if not chosen:
            raise ValueError(f"no evaluator of config.evals is final; name those to run "
                             f"({', '.join(by_name) or 'there are none'})")
        return chosen
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"no evaluator named {', '.join(map(repr, unknown))}; config.evals has "
                         f"{', '.join(by_name) or 'none'}")
    return [by_name[n] for n in dict.fromkeys(names)]


def run(evaluators: Sequence[Evaluator], predict: PredictFn, source_names: Sequence[str],
        aus: Sequence[int]) -> dict[str, float]:
    """The metrics of several evaluators, merged (their keys never collide: `problems`)."""
    results: dict[str, float] = {}
    for evaluator in evaluators:
        results.update(evaluator(predict, source_names, aus))
    return results


# ---------------------------------------------------------------------------------------------
# Checks of `config.evals` (called by fbnet_jax.train.checks.validate).

def problems(config: ml_collections.ConfigDict) -> list[str]:
    """What is wrong with `config.evals`, one message per problem (empty: nothing)."""
    out: list[str] = []
    if not isinstance(config.get("evals"), ml_collections.ConfigDict):
        return ["evals: missing; a dict of named evaluators (fbnet_jax/eval/evaluators/)"]
    source_names = pipeline.source_names(config.data)
    splits = {n: set(pipeline.source_splits(config.data.sources[n])) for n in source_names
              if config.data.sources[n].kind in pipeline.SOURCE_KINDS}
    seen: dict[tuple[str, str], str] = {}
    for name in config.evals.keys():
        entry, path = config.evals[name], f"evals.{name}"
        if not _NAME.fullmatch(name):
            out.append(f"{path}: an evaluator's name must be letters, digits and '_' (it names "
                       f"files)")
        if not isinstance(entry, ml_collections.ConfigDict) or "kind" not in entry:
            out.append(f"{path}: must be an evaluator (fbnet_jax/eval/evaluators/: "
                       f"{', '.join(f'{kind}(...)' for kind in KINDS)})")
            continue
        if entry.kind not in KINDS:
            out.append(f"{path}.kind: {entry.kind!r} is not one of {', '.join(KINDS)}")
            continue
        fields = set(COMMON_FIELDS) | set(KINDS[entry.kind].fields)
        out += [f"{path}.{f}: not a field of a {entry.kind!r} evaluator (its fields: "
                f"{', '.join(sorted(fields))})" for f in sorted(set(entry.keys()) - fields)]
        missing = sorted(fields - set(entry.keys()))
        if missing:
            out.append(f"{path}: missing {', '.join(missing)}")
            continue
        out += _entry_problems(path, entry, config.data, splits)
        key = (entry.kind, entry.split)
        if key in seen:
            out.append(f"{path}: {seen[key]} computes {entry.kind} metrics of split "
                       f"{entry.split!r} too, under the same keys; make them one evaluator")
        seen.setdefault(key, path)
    return out


def _entry_problems(path, entry, config_data, splits) -> list[str]:
    """The problems of a complete entry of a known kind: its common fields, then its kind's."""
    out = []
    source_names = pipeline.source_names(config_data)
    if not isinstance(entry.every, int) or isinstance(entry.every, bool) or entry.every < 0:
        out.append(f"{path}.every: must be an integer >= 0, got {entry.every!r}")
    if not isinstance(entry.final, bool):
        out.append(f"{path}.final: must be True or False, got {entry.final!r}")
    sources = entry.sources
    if isinstance(sources, str) or not all(isinstance(s, str) for s in sources):
        return out + [f"{path}.sources: must be a tuple of source names, got {sources!r}"]
    unknown = [s for s in sources if s not in source_names]
    if unknown:
        return out + [f"{path}.sources: no source named {', '.join(map(repr, unknown))} in "
                      f"data.sources ({', '.join(source_names)})"]
    chosen = [s for s in (sources or trained_sources(config_data)) if s in splits]
    out += base.split_problems(path, "split", entry.split, chosen, splits)
    return out + KINDS[entry.kind].problems(path, entry, chosen, splits)
