"""Orbax checkpoints of a run: train state, data iterator state and config, saved together.

A step directory holds three items: `state` (the train state pytree), `data` (the grain iterator
state, one file per process) and `config` (JSON). Restoring all three continues a run on exactly
the batch where it stopped. Saves are asynchronous; a save that dies half-way leaves a temporary
directory that orbax ignores, so the previous checkpoint stays the latest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

CHECKPOINT_DIR = "checkpoints"


def create_manager(workdir: str | Path, *, max_to_keep: int = 2, best_metric: str | None = None,
                   best_mode: str = "max", read_only: bool = False) -> ocp.CheckpointManager:
    """A manager under `workdir/checkpoints` that keeps the latest N and the best checkpoint.

    Args:
      workdir: the run's work directory.
      max_to_keep: how many of the latest checkpoints to keep.
      best_metric: a key of the metrics passed to `save`; the checkpoint with the best value is
        kept as well. None keeps only the latest.
      best_mode: "max" or "min" for `best_metric`.
      read_only: open an existing run for evaluation without writing to it.
    """
    if best_mode not in ("max", "min"):
        raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    policy = policies.LatestN(n=max_to_keep)
    if best_metric:
        policy = policies.AnyPreservationPolicy([policy, policies.BestN(
            get_metric_fn=lambda metrics: metrics[best_metric],
            reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False)])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only, enable_async_checkpointing=True)
    return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINT_DIR, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, config: ml_collections.ConfigDict,
         data_iterator: Any = None, metrics: Mapping[str, float] | None = None) -> None:
    """Starts an asynchronous save of state, iterator state and config at `step`.

    Raises:
      FloatingPointError: a metric is not finite; a checkpoint from a diverged run would
        overwrite good ones under keep-latest-N, so it is refused.
    """
    if metrics and not all(math.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(f"refusing to checkpoint step {step}: non-finite metrics "
                                 f"{ {k: v for k, v in metrics.items() if not math.isfinite(v)} }")
    items = dict(state=ocp.args.StandardSave(state),
                 config=ocp.args.JsonSave(json.loads(config.to_json())))
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    manager.save(step, args=ocp.args.Composite(**items),
                 metrics=dict(metrics) if metrics else None, force=True)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, *, step: int | None = None,
            data_iterator: Any = None) -> tuple[Any, int] | None:
    """Restores the train state (and the iterator, in place) of `step` (default: the latest).

    Args:
      manager: from `create_manager`.
      abstract_state: a pytree of `jax.ShapeDtypeStruct` with shardings, the target layout.
      step: the step to restore; None picks the latest.
      data_iterator: a grain iterator whose state is set to the saved one, when given.

    Returns:
      (state, step), or None when there is no checkpoint.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], step


def abstract_like(state: Any) -> Any:
    """The restore target for a state: shapes, dtypes and shardings, no data."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a run was started with (`workdir/config.json`), as a locked ConfigDict."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; is {workdir} the work directory of a run?")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    config = ml_collections.ConfigDict(_lists_to_tuples(values))
    config.lock()
    return config


def _lists_to_tuples(value: Any) -> Any:
    """JSON has no tuples; configs use them (AU lists, widths), so lists are turned back."""
    if isinstance(value, dict):
        return {k: _lists_to_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_lists_to_tuples(v) for v in value)
    return value


def config_differences(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """Dotted paths whose values differ between two config dicts (JSON form), as 'a.b: x -> y'."""
    def flat(tree, prefix=""):
        if isinstance(tree, Mapping):
            out = {}
            for key, value in tree.items():
                out.update(flat(value, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: tree}

    a, b = flat(before), flat(after)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]

