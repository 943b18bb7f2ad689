"""The compound-expression evaluators, on the compound-labelled faces of RAF-DB's 11 compound
classes (fbnet_jax/eval/compound.py), keyed `{split}/{source}/compound_{metric}`:

  compound_zero_shot  the classes from the network's AU and expression probabilities.
  compound_few_shot   k-shot linear probe and nearest class mean on the features, for each k of
                      `ks`, over `draws` random support sets (drawn from `seed`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from fbnet_jax.eval import compound
from fbnet_jax.eval.evaluators import base


def compound_zero_shot(split: str, *, sources: Sequence[str] = (), every: int = 0,
                       final: bool = True) -> ml_collections.ConfigDict:
    """A config entry: zero-shot compound expressions on the compound-labelled faces of `split`."""
    return base.entry("compound_zero_shot", split, sources, every, final)


def compound_few_shot(split: str, *, sources: Sequence[str] = (), every: int = 0,
                      final: bool = True, ks: Sequence[int] = compound.KS,
                      draws: int = compound.DRAWS, seed: int = 0) -> ml_collections.ConfigDict:
    """A config entry: k-shot compound expressions for each k of `ks`, `draws` support sets each."""
    return base.entry("compound_few_shot", split, sources, every, final, ks=tuple(ks),
                      draws=int(draws), seed=int(seed))


def _keys(split: str, sources: tuple[str, ...], names: Sequence[str]) -> tuple[str, ...]:
    """The sorted keys of `names` and of every compound evaluator's `count` and `chance_uar`,
    for each source."""
    return tuple(sorted(f"{split}/{source}/compound_{name}" for source in sources
                        for name in ("count", "chance_uar", *names)))


class ZeroShot(base.Kind):
    """Compound classes read off the AU and expression probabilities, without training."""
    name = "compound_zero_shot"
    fields: Mapping[str, Any] = {}
    outputs = ("expression_logits", "au_logits")

    def run(self, predict: base.PredictFn, split: str, sources: tuple[str, ...],
            options: Mapping[str, Any], source_names: Sequence[str],
            aus: Sequence[int]) -> dict[str, float]:
        outputs, labels = predict(split, sources, self.outputs)
        return compound.zero_shot_evaluation(outputs, labels, source_names, aus=aus,
                                             prefix=split)

    def metric_names(self, split: str, sources: tuple[str, ...], options: Mapping[str, Any],
                     aus: Sequence[int]) -> tuple[str, ...]:
        return _keys(split, sources, [f"zero_shot_{m}" for m in (
            "accuracy", "uar", "macro_f1", "au_uar", "expression_uar")])


class FewShot(base.Kind):
    """Compound classes learnt from k labelled faces each, on the features."""
    name = "compound_few_shot"
    fields = {"ks": compound.KS, "draws": compound.DRAWS, "seed": 0}
    outputs = ("features",)

    def run(self, predict: base.PredictFn, split: str, sources: tuple[str, ...],
            options: Mapping[str, Any], source_names: Sequence[str],
            aus: Sequence[int]) -> dict[str, float]:
        outputs, labels = predict(split, sources, self.outputs)
        return compound.few_shot_evaluation(
            outputs, labels, source_names, prefix=split, ks=tuple(options["ks"]),
            draws=int(options["draws"]), seed=int(options["seed"]))

    def metric_names(self, split: str, sources: tuple[str, ...], options: Mapping[str, Any],
                     aus: Sequence[int]) -> tuple[str, ...]:
        names = []
        for k in options["ks"]:
            names.append(f"few_shot_k{k}_classes")
            for infix in ("", "ncm_"):
                names += [f"few_shot_{infix}k{k}_{stat}"
                          for stat in ("uar", "uar_std", "accuracy", "accuracy_std")]
        return _keys(split, sources, names)

    def problems(self, path: str, entry: ml_collections.ConfigDict, chosen: Sequence[str],
                 splits: Mapping[str, set[str]]) -> list[str]:
        out = []
        ks = entry.ks
        if (isinstance(ks, (str, int)) or not ks
                or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks)):
            out.append(f"{path}.ks: must be a tuple of integers >= 1, got {ks!r}")
        if not isinstance(entry.draws, int) or isinstance(entry.draws, bool) or entry.draws < 1:
            out.append(f"{path}.draws: must be an integer >= 1, got {entry.draws!r}")
        if not isinstance(entry.seed, int) or isinstance(entry.seed, bool) or entry.seed < 0:
            out.append(f"{path}.seed: must be an integer >= 0, got {entry.seed!r}")
        return out


ZERO_SHOT = ZeroShot()
FEW_SHOT = FewShot()
