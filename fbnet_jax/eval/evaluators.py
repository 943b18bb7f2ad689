"""Evaluators: the evaluations a config describes (`config.evals`), one contract for all.

An experiment's `config.evals` is a dict of named evaluators. Each names its kind, the split and
sources it reads (`()`: the sources trained on, weight > 0; an evaluation-only source of weight
0 is read only by the evaluators that name it), how often it runs during training (`every` steps; 0: never periodically) and
whether it is part of the final evaluation (`final`: after the last step, into `metrics.json`
and the report, and what `fbnet eval` runs by default):

  config.evals.validation = evaluators.tasks("validation", every=500)
  config.evals.test = evaluators.tasks("test", final=True, au_thresholds_from="validation")
  config.evals.compound_zero_shot = evaluators.compound_zero_shot("test", sources=("rafdb_compound",))

Kinds (`KINDS`):
  tasks               every metric of docs/design.md#metrics (expressions, AUs, VA) per
                      source and for the evaluator's sources together; `au_thresholds_from`
                      names a split of the same sources to tune per-AU thresholds on
                      (`au_tuned_*` keys).
  compound_zero_shot  RAF-DB's 11 compound classes from the network's AU and expression
                      probabilities (fbnet_jax/eval/compound.py).
  compound_few_shot   k-shot linear probe and nearest class mean on the features, for each k of
                      `ks`, over `draws` random support sets.

The contract (after big_vision's evaluators): an `Evaluator` is called with a predict function
`predict(split, sources, output_keys) -> (outputs, labels)`, the model's outputs and the labels
of every example of those sources' split (numpy, rows aligned, `labels["valid"]` 0 on padding),
and returns flat metrics `{split}/{metric}` (the evaluator's sources together, tasks only) and
`{split}/{source}/{task}_{metric}`. Training and `fbnet eval` build the predict function (one
pass over each split, however many evaluators read it: fbnet_jax/eval/evaluate.py); a test can pass
one that returns fixed arrays.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from data_pipelines import pipeline
from fbnet_jax.eval import compound, metrics

TASK_OUTPUTS = ("expression_logits", "au_logits", "va")
KINDS = ("tasks", "compound_zero_shot", "compound_few_shot")
# The fields of every evaluator, and those of each kind (with their defaults).
COMMON_FIELDS = ("kind", "split", "sources", "every", "final")
KIND_FIELDS = {
    "tasks": {"au_thresholds_from": ""},
    "compound_zero_shot": {},
    "compound_few_shot": {"ks": compound.KS, "draws": compound.DRAWS, "seed": 0},
}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")

# predict(split, sources, output keys) -> (outputs, labels), numpy, rows aligned.
PredictFn = Callable[[str, tuple[str, ...], tuple[str, ...]],
                     tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]


# ---------------------------------------------------------------------------------------------
# Config entries.

def _entry(kind: str, split: str, sources: Sequence[str], every: int, final: bool,
           **options) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        kind=kind,                 # tasks | compound_zero_shot | compound_few_shot
        split=split,               # the split it reads
        sources=tuple(sources),    # names in data.sources; () = the sources trained on
                                   # (weight > 0): name evaluation-only sources explicitly
        every=int(every),          # steps between runs during training; 0 = not periodic
        final=bool(final),         # runs after the last step (metrics.json, report) and is
                                   # what `fbnet eval` runs by default
        **options))


def tasks(split: str, *, sources: Sequence[str] = (), every: int = 0, final: bool = False,
          au_thresholds_from: str = "") -> ml_collections.ConfigDict:
    """A config entry: the task metrics of `split` (`au_thresholds_from`: a split of the same
    sources to tune per-AU thresholds on, "" for none)."""
    return _entry("tasks", split, sources, every, final, au_thresholds_from=au_thresholds_from)


def compound_zero_shot(split: str, *, sources: Sequence[str] = (), every: int = 0,
                       final: bool = True) -> ml_collections.ConfigDict:
    """A config entry: zero-shot compound expressions on the compound-labelled faces of `split`."""
    return _entry("compound_zero_shot", split, sources, every, final)


def compound_few_shot(split: str, *, sources: Sequence[str] = (), every: int = 0,
                      final: bool = True, ks: Sequence[int] = compound.KS,
                      draws: int = compound.DRAWS, seed: int = 0) -> ml_collections.ConfigDict:
    """A config entry: k-shot compound expressions for each k of `ks`, `draws` support sets each."""
    return _entry("compound_few_shot", split, sources, every, final, ks=tuple(ks),
                  draws=int(draws), seed=int(seed))


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
      options: the kind's own fields (KIND_FIELDS).
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
        if self.kind == "tasks":
            return TASK_OUTPUTS
        if self.kind == "compound_zero_shot":
            return ("expression_logits", "au_logits")
        return ("features",)

    @property
    def splits(self) -> tuple[str, ...]:
        """Every split it reads: its own, and the one it tunes AU thresholds on."""
        tune = self.options.get("au_thresholds_from", "")
        return (self.split, tune) if tune else (self.split,)

    def runs_at(self, step: int, num_steps: int) -> bool:
        """Whether it runs after training step `step` (the final evaluation is separate)."""
        return bool(self.every) and step % self.every == 0 and step < num_steps

    def on_split(self, split: str) -> Evaluator:
        """The same evaluation of another split (`fbnet eval --split`). Thresholds are not tuned
        on the split being scored: that would flatter it."""
        options = dict(self.options)
        if options.get("au_thresholds_from") == split:
            options["au_thresholds_from"] = ""
        return dataclasses.replace(self, split=split, options=options)

    def __call__(self, predict: PredictFn, source_names: Sequence[str],
                 aus: Sequence[int]) -> dict[str, float]:
        """The flat metrics of this evaluation.

        Args:
          predict: `predict(split, sources, output_keys) -> (outputs, labels)`.
          source_names: every source of the config in source-index order (labels["source"]).
          aus: the AU numbers of the "au_logits" columns.
        """
        outputs, labels = predict(self.split, self.sources, self.outputs)
        if self.kind == "tasks":
            results = metrics.evaluate_arrays(outputs, labels, source_names, aus=aus,
                                              prefix=self.split)
            tune = self.options["au_thresholds_from"]
            if tune:
                tune_outputs, tune_labels = predict(tune, self.sources, self.outputs)
                results.update(metrics.tuned_au_metrics(tune_outputs, tune_labels, outputs,
                                                        labels, aus=aus, prefix=self.split))
            return results
        if self.kind == "compound_zero_shot":
            return compound.zero_shot_evaluation(outputs, labels, source_names, aus=aus,
                                                 prefix=self.split)
        return compound.few_shot_evaluation(
            outputs, labels, source_names, prefix=self.split, ks=tuple(self.options["ks"]),
            draws=int(self.options["draws"]), seed=int(self.options["seed"]))

    def metric_names(self, aus: Sequence[int]) -> tuple[str, ...]:
        """Every key it can return (a real split returns those its labels allow)."""
        if self.kind == "tasks":
            names = set(metrics.metric_names(self.sources, aus, self.split))
            if self.options["au_thresholds_from"]:
                names |= set(metrics.tuned_au_metric_names(aus, self.split))
            return tuple(sorted(names))
        return tuple(sorted(f"{self.split}/{source}/compound_{name}" for source in self.sources
                            for name in _compound_names(self.kind, self.options)))


def _compound_names(kind: str, options: Mapping[str, Any]) -> list[str]:
    names = ["count", "chance_uar"]
    if kind == "compound_zero_shot":
        return names + [f"zero_shot_{m}" for m in ("accuracy", "uar", "macro_f1", "au_uar",
                                                   "expression_uar")]
    for k in options["ks"]:
        names.append(f"few_shot_k{k}_classes")
        for infix in ("", "ncm_"):
            names += [f"few_shot_{infix}k{k}_{stat}"
                      for stat in ("uar", "uar_std", "accuracy", "accuracy_std")]
    return names


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
        options = {field: entry[field] for field in KIND_FIELDS[entry.kind]}
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
# Checks of `config.evals` (called by fbnet_jax.config.checks.validate).

def problems(config: ml_collections.ConfigDict) -> list[str]:
    """What is wrong with `config.evals`, one message per problem (empty: nothing)."""
    out: list[str] = []
    if not isinstance(config.get("evals"), ml_collections.ConfigDict):
        return ["evals: missing; a dict of named evaluators (fbnet_jax/eval/evaluators.py)"]
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
            out.append(f"{path}: must be an evaluator (fbnet_jax/eval/evaluators.py: tasks(...), "
                       f"compound_zero_shot(...), compound_few_shot(...))")
            continue
        if entry.kind not in KINDS:
            out.append(f"{path}.kind: {entry.kind!r} is not one of {', '.join(KINDS)}")
            continue
        fields = set(COMMON_FIELDS) | set(KIND_FIELDS[entry.kind])
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
    for field in ("split", "au_thresholds_from"):
        split = entry.get(field, "")
        if field == "au_thresholds_from" and not split:
            continue
        lacking = [s for s in chosen if split not in splits[s]]
        if lacking:
            common = set.intersection(*(set(splits[s]) for s in chosen)) - {"train"}
            out.append(f"{path}.{field}: {split!r} is not a split of {', '.join(lacking)} "
                       f"(splits of every source it reads: {', '.join(sorted(common)) or 'none'})")
    if entry.get("au_thresholds_from") == entry.split:
        out.append(f"{path}.au_thresholds_from: thresholds tuned on the split being scored "
                   f"({entry.split!r}) would flatter it; name another split or ''")
    if entry.kind == "compound_few_shot":
        ks = entry.ks
        if (isinstance(ks, (str, int)) or not ks
                or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks)):
            out.append(f"{path}.ks: must be a tuple of integers >= 1, got {ks!r}")
        if not isinstance(entry.draws, int) or isinstance(entry.draws, bool) or entry.draws < 1:
            out.append(f"{path}.draws: must be an integer >= 1, got {entry.draws!r}")
        if not isinstance(entry.seed, int) or isinstance(entry.seed, bool) or entry.seed < 0:
            out.append(f"{path}.seed: must be an integer >= 0, got {entry.seed!r}")
    return out


def from_train_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """`evals` (as JSON values) for a config saved before evaluators existed, from its
    `train.eval_split`, `eval_every`, `test_split` and `tune_au_thresholds`, which it drops:
    the periodic evaluation and the final one as they ran, over every source (weight 0 too)."""
    train = values.get("train", {})
    eval_split, test_split = train.pop("eval_split"), train.pop("test_split")
    every, tune = train.pop("eval_every"), train.pop("tune_au_thresholds")
    every_source = tuple(sorted(values.get("data", {}).get("sources", {})))
    if eval_split == test_split:  # one evaluation, periodic and final (no tuning possible)
        return {"test": tasks(test_split, sources=every_source, every=every,
                              final=True).to_dict()}
    return {"validation": tasks(eval_split, sources=every_source, every=every).to_dict(),
            "test": tasks(test_split, sources=every_source, final=True,
                          au_thresholds_from=eval_split if tune else "").to_dict()}
