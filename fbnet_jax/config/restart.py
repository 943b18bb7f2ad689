"""A restart against its checkpoint: which changes of a config a run may continue with.

`check_restart` compares a config with the one stored in a run's checkpoint:

- fields that change neither the trained weights nor the data order (`FREE_FIELDS`: logging,
  checkpoint cadence, the evaluators, data workers), `parallel.mode` (both
  modes give the same numbers) and the non-finite policy may change on any restart;
- a change of the train state's shapes (the model, the AU list, the image size of a backbone
  with dense layers, the optimizer) can never continue a run: the restore would fail (the
  runtime layer says which leaves differ: `fbnet_jax.runtime.state.shape_change`);
- any other change (learning rate, steps, seed, sources, weights, ...) makes the continued run a
  different experiment from the one its first steps belong to, and is refused unless asked for
  (`allow_changes`, the `--allow_config_change` flag).

The checks of one config on its own are each layer's `problems(config)`, gathered by
`fbnet_jax.train.checks.validate`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from flax import traverse_util

from fbnet_jax.config import migrate
from fbnet_jax.core.errors import ConfigError

# Fields a restart may change (`*` is one path component).
FREE_FIELDS = (
    "name",
    "data.num_workers", "data.eval_batch_size", "data.read_threads", "data.prefetch_buffer_size",
    "data.worker_buffer_size", "data.validate_records", "data.render_cache_dir",
    "data.render_processes", "data.device_prefetch",
    "data.sources.*.validation_size", "data.sources.*.test_size", "data.sources.*.cache",
    "train.log_every", "train.checkpoint_every", "train.stop_after_steps",
    "train.profile_steps", "train.nonfinite",
    "train.nonfinite_max_in_a_row", "parallel.mode",
    "model.init_from",  # read by a fresh run only; a restart restores its checkpoint
    "train.max_checkpoints_to_keep", "train.best_metric", "train.best_mode",
    "evals.*", "evals.*.*",   # the evaluators: what is measured, not what is trained
)


def matches(path: str, patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        regex = "\\.".join("[^.]+" if part == "*" else re.escape(part)
                           for part in pattern.split("."))
        if re.fullmatch(regex, path):
            return True
    return False


def as_plain(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """A config as plain JSON-like values (tuples become lists), for comparisons."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json())
    return json.loads(json.dumps(config))


def differences(before, after) -> list[tuple[str, Any, Any]]:
    """(dotted path, value before, value after) of each leaf that differs; "<absent>" if missing."""
    a = traverse_util.flatten_dict(as_plain(before), sep=".")
    b = traverse_util.flatten_dict(as_plain(after), sep=".")
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>"))
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def format_difference(path: str, before: Any, after: Any) -> str:
    return f"{path}: {before!r} -> {after!r}"


# --- a restart against the run's checkpoint -----------------------------------------------

def with_field(config: ml_collections.ConfigDict, path: str, value: Any):
    """A copy of `config` (JSON-derived) with one dotted field set to `value`."""
    plain = as_plain(config)
    node = plain
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return migrate.config_from_json(plain)


# (saved config, config, step) -> None when the config builds a train state of the checkpoint's
# shapes, else why not (`fbnet_jax.runtime.state.shape_change`).
ShapeChange = Callable[[ml_collections.ConfigDict, ml_collections.ConfigDict, int], str | None]


def check_restart(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, *,
                  step: int, shape_change: ShapeChange, allow_changes: bool = False,
                  what: str = "the run") -> list[str]:
    """Checks that `config` can continue a run whose checkpoint of `step` was saved with `saved`.

    `shape_change` is asked only when a field that changes the training differs.

    Returns:
      Notes for the log: the accepted differences, one line each (empty: same config).

    Raises:
      ConfigError: the state's shapes differ (never restorable; the fields responsible are
        named), or the training would change and `allow_changes` is False.
    """
    diffs = differences(saved, config)
    if not diffs:
        return []
    free = [d for d in diffs if matches(d[0], FREE_FIELDS)]
    training = [d for d in diffs if d not in free]
    blocking: list[str] = []
    if training:
        problem = shape_change(saved, config, step)
        if problem:
            blocking.append(problem)
    if blocking:
        raise ConfigError(blocking + ["keep the run's values for these fields, or start a new "
                                      "run in another --workdir"],
                          header=f"cannot continue {what} with this config")
    if training and not allow_changes:
        raise ConfigError(
            [format_difference(*d) for d in training]
            + ["these change the training of a run whose first steps were made without them; "
               "pass --allow_config_change to continue with them anyway (recorded in config.json "
               "and train.log), or start a new run in another --workdir"],
            header=f"the config differs from the one {what} was trained with (its checkpoint of "
                   f"step {step})")
    notes = [f"changed (no effect on the training): {format_difference(*d)}" for d in free]
    notes += [f"changed (--allow_config_change): {format_difference(*d)}" for d in training]
    return notes
