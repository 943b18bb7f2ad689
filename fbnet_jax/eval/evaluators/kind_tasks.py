"""The `tasks` evaluator: every metric of docs/design.md#metrics (expressions, AUs, VA) per source
and for the evaluator's sources together (fbnet_jax/eval/metrics.py).

Its field `au_thresholds_from` names a split of the same sources to tune per-AU thresholds on
(`au_tuned_*` keys; "" for none), never the split scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from fbnet_jax.eval import metrics
from fbnet_jax.eval.evaluators import base

TASK_OUTPUTS = ("expression_logits", "au_logits", "va")


def tasks(split: str, *, sources: Sequence[str] = (), every: int = 0, final: bool = False,
          au_thresholds_from: str = "") -> ml_collections.ConfigDict:
    """A config entry: the task metrics of `split` (`au_thresholds_from`: a split of the same
    sources to tune per-AU thresholds on, "" for none)."""
    return base.entry("tasks", split, sources, every, final, au_thresholds_from=au_thresholds_from)


class Tasks(base.Kind):
    """The task metrics of a split, with AU thresholds tuned on another when asked."""
    name = "tasks"
    fields = {"au_thresholds_from": ""}
    outputs = TASK_OUTPUTS

    def splits(self, split: str, options: Mapping[str, Any]) -> tuple[str, ...]:
        """Its own split, and the one it tunes AU thresholds on."""
        tune = options.get("au_thresholds_from", "")
        return (split, tune) if tune else (split,)

    def on_split(self, split: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """Thresholds are not tuned on the split being scored: that would flatter it."""
        options = dict(options)
        if options.get("au_thresholds_from") == split:
            options["au_thresholds_from"] = ""
        return options

    def run(self, predict: base.PredictFn, split: str, sources: tuple[str, ...],
            options: Mapping[str, Any], source_names: Sequence[str],
            aus: Sequence[int]) -> dict[str, float]:
        outputs, labels = predict(split, sources, self.outputs)
        results = metrics.evaluate_arrays(outputs, labels, source_names, aus=aus, prefix=split)
        tune = options["au_thresholds_from"]
        if tune:
            tune_outputs, tune_labels = predict(tune, sources, self.outputs)
            results.update(metrics.tuned_au_metrics(tune_outputs, tune_labels, outputs, labels,
                                                    aus=aus, prefix=split))
        return results

    def metric_names(self, split: str, sources: tuple[str, ...], options: Mapping[str, Any],
                     aus: Sequence[int]) -> tuple[str, ...]:
        names = set(metrics.metric_names(sources, aus, split))
        if options["au_thresholds_from"]:
            names |= set(metrics.tuned_au_metric_names(aus, split))
        return tuple(sorted(names))

    def problems(self, path: str, entry: ml_collections.ConfigDict, chosen: Sequence[str],
                 splits: Mapping[str, set[str]]) -> list[str]:
        tune = entry.au_thresholds_from
        out = base.split_problems(path, "au_thresholds_from", tune, chosen, splits) if tune else []
        if tune == entry.split:
            out.append(f"{path}.au_thresholds_from: thresholds tuned on the split being scored "
                       f"({entry.split!r}) would flatter it; name another split or ''")
        return out


KIND = Tasks()
