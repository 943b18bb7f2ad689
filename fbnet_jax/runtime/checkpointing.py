"""Orbax checkpoints of a run: train state and config, saved together.

A step directory holds two items: `state` (the train state pytree, in the jit layout whatever
`parallel.mode` wrote it) and `config` (JSON). The data iterator needs no item of its own: the
data order is a function of the config and the step (data_pipelines/pipeline.py), so a run
continues on exactly the batch where it stopped, on any number of processes. (Checkpoints of
earlier versions also hold a `data` item, the grain iterator state; it is not read.) The config
stored with a checkpoint is the authority for restoring and evaluating it. Saves are
asynchronous; a save that dies half-way leaves a temporary directory that orbax ignores, so the
previous checkpoint stays the latest. `save` refuses a state holding a NaN or an infinity, so no
checkpoint ever holds one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from fbnet_jax.config.migrate import config_from_json
from fbnet_jax.runtime import parallel
from fbnet_jax.core.errors import UserError

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
    # A read-only manager is what was asked for; orbax warns that it is read-only.
    with _absl_level(logging.ERROR) if read_only else contextlib.nullcontext():
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only, enable_async_checkpointing=True)
        return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINT_DIR, options=options)


@contextlib.contextmanager
def _absl_level(level: int):
    """Temporarily raises the level of the `absl` logger (orbax logs through absl)."""
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(max(level, previous))
    try:
        yield
    finally:
        logger.setLevel(previous)


@jax.jit
def _finite_leaves(tree: Any) -> Any:
    """Per leaf: True unless a floating-point leaf holds a NaN or an infinity."""
    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                        else jnp.bool_(True), tree)


def non_finite_leaves(tree: Any) -> list[str]:
    """Paths (`params/backbone/Conv_0/kernel`) of the floating-point leaves holding NaN or inf."""
    flags = parallel.to_host(_finite_leaves(tree))
    return [jax.tree_util.keystr(path, simple=True, separator="/")
            for path, ok in jax.tree_util.tree_leaves_with_path(flags) if not ok]


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, config: ml_collections.ConfigDict,
         metrics: Mapping[str, float] | None = None) -> None:
    """Starts an asynchronous save of state and config at `step`, by every process together.

    Raises:
      FloatingPointError: the state or a metric holds a NaN or an infinity. A checkpoint of a
        diverged run would push good ones out under keep-latest-N, and a restart would continue
        from it, so it is refused (nothing is written).
    """
    if metrics and not all(math.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(f"refusing to checkpoint step {step}: non-finite metrics "
                                 f"{ {k: v for k, v in metrics.items() if not math.isfinite(v)} }")
    bad = non_finite_leaves(state)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise FloatingPointError(f"refusing to checkpoint step {step}: the train state holds NaN "
                                 f"or infinite values in {shown}")
    items = dict(state=ocp.args.StandardSave(state),
                 config=ocp.args.JsonSave(json.loads(config.to_json())))
    manager.save(step, args=ocp.args.Composite(**items),
                 metrics=dict(metrics) if metrics else None, force=True)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, *,
            step: int | None = None) -> tuple[Any, int] | None:
    """Restores the train state of `step` (default: the latest).

    Args:
      manager: from `create_manager`.
      abstract_state: a pytree of `jax.ShapeDtypeStruct` with shardings, the target layout.
      step: the step to restore; None picks the latest.

    Returns:
      (state, step), or None when there is no checkpoint.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    with _reading(manager, step):
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], step


def read_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
    """The config stored with the checkpoint of `step` (locked)."""
    with _reading(manager, step):
        restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return config_from_json(restored["config"])


@contextlib.contextmanager
def _reading(manager: ocp.CheckpointManager, step: int):
    """Turns a failure to read a checkpoint into one message naming its directory.

    Callers check shapes against the checkpoint's own config first, so what is left is a
    damaged or incomplete step directory (or one written by an incompatible version).
    """
    try:
        yield
    except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many kinds
        path = Path(manager.directory) / str(step)
        lines = (str(e.args[0]) if e.args else str(e)).strip().splitlines() or [""]
        detail = lines[0].split(" [tensorstore_spec")[0]  # tensorstore appends whole specs
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        raise UserError(f"{path}: the checkpoint of step {step} cannot be read "
                        f"({type(e).__name__}: {detail}); it is damaged or "
                        f"incomplete: move that directory away to continue from the checkpoint "
                        f"before it") from e


def open_checkpoint(path: str | Path) -> tuple[ocp.CheckpointManager, int]:
    """A read-only manager over a checkpoint directory on its own (`<workdir>/checkpoints/<step>`,
    copied anywhere), and its step. The caller closes the manager.

    Raises:
      UserError: `path` is not a directory named by a step.
    """
    path = Path(path)
    if not path.is_dir() or not path.name.isdigit():
        raise UserError(f"--checkpoint {path}: not a checkpoint directory (its name is the "
                        f"step, e.g. <workdir>/checkpoints/400)")
    with _absl_level(logging.ERROR):
        manager = ocp.CheckpointManager(path.parent.absolute(), options=ocp.CheckpointManagerOptions(
            read_only=True, create=False))
    return manager, int(path.name)


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir) / CHECKPOINT_DIR


def saved_steps(workdir: str | Path) -> list[int]:
    """The steps of the run's finished checkpoints, ascending ([] if none; creates nothing)."""
    if not checkpoint_dir(workdir).is_dir():
        return []
    manager = create_manager(workdir, read_only=True)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def abstract_like(state: Any) -> Any:
    """The restore target for a state: shapes, dtypes and shardings, no data."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config the run's latest invocation wrote (`workdir/config.json`), locked.

    A checkpoint's own config (`read_config`) is the authority for that checkpoint; this file is
    the readable copy for people and scripts.
    """
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; is {workdir} the work directory of a run?")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return config_from_json(values)
