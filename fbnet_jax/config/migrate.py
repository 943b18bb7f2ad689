"""Stored configs of older runs, completed to today's fields.

A run's config is stored with each checkpoint and as `config.json`. Fields added since are
filled in with the value that runs saved without them behaved as (`ADDED_FIELDS`), so an older
run can still be evaluated, restarted and compared with today's configs. Each migration writes
the values of its time literally: it must not change when today's defaults do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

# Config fields added after runs could be saved, with the value that runs saved without them
# behaved as: a stored config is completed with them, so an older run can still be evaluated,
# restarted and compared with today's configs.
ADDED_FIELDS = {
    "model.init_from": "",
    "loss.co_annotation.au_targets": "hard",
    "data.render_cache_dir": "",
    "data.render_processes": 0,
    "data.device_prefetch": 0,
    "parallel.mode": "jit",
    "train.grad_accum_steps": 1,
    "train.nonfinite": "stop",
    "train.nonfinite_max_in_a_row": 10,
}


def _with_added_fields(values: dict[str, Any]) -> dict[str, Any]:
    if "evals" not in values and "eval_split" in values.get("train", {}):
        # Saved before `config.evals`: its train.* evaluation fields become the evaluators
        # that ran then.
        values["evals"] = _evals_from_train_fields(values)
    for path, value in ADDED_FIELDS.items():
        *parents, leaf = path.split(".")
        node = values
        for key in parents:
            node = node.setdefault(key, {})
        node.setdefault(leaf, value)
    for source in values.get("data", {}).get("sources", {}).values():
        if not isinstance(source, dict):
            continue
        if source.get("kind") == "synthetic":
            source.setdefault("cache", False)   # saved before the field: rendered every time
        else:
            # Dataset sources saved before the field read the PNG preparation (0).
            source.setdefault("prepared_image_size", 0)
    return values


def config_from_json(values: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A locked ConfigDict from a config's JSON values (completed with `ADDED_FIELDS`)."""
    config = ml_collections.ConfigDict(_with_added_fields(lists_to_tuples(dict(values))))
    config.lock()
    return config


def lists_to_tuples(value: Any) -> Any:
    """JSON has no tuples; configs use them (AU lists, widths), so lists are turned back."""
    if isinstance(value, Mapping):
        return {k: lists_to_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(lists_to_tuples(v) for v in value)
    return value


def _tasks_entry(split: str, sources: tuple[str, ...], every: int, final: bool,
                 au_thresholds_from: str = "") -> dict[str, Any]:
    """A `tasks` evaluator entry as `fbnet_jax.eval.evaluators.tasks` wrote it when `evals` came."""
    return {"kind": "tasks", "split": split, "sources": sources, "every": int(every),
            "final": bool(final), "au_thresholds_from": au_thresholds_from}


def _evals_from_train_fields(values: dict[str, Any]) -> dict[str, Any]:
    """`evals` for a config saved before evaluators existed, from its `train.eval_split`,
    `eval_every`, `test_split` and `tune_au_thresholds`, which it drops: the periodic evaluation
    and the final one as they ran, over every source (weight 0 too)."""
    train = values.get("train", {})
    eval_split, test_split = train.pop("eval_split"), train.pop("test_split")
    every, tune = train.pop("eval_every"), train.pop("tune_au_thresholds")
    every_source = tuple(sorted(values.get("data", {}).get("sources", {})))
    if eval_split == test_split:  # one evaluation, periodic and final (no tuning possible)
        return {"test": _tasks_entry(test_split, every_source, every, final=True)}
    return {"validation": _tasks_entry(eval_split, every_source, every, final=False),
            "test": _tasks_entry(test_split, every_source, 0, final=True,
                                 au_thresholds_from=eval_split if tune else "")}
