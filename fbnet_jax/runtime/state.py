"""The train state and how a config creates it (shared by training and evaluation)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from fbnet_jax import model as models
from fbnet_jax.config import restart
from fbnet_jax.core import checks
from fbnet_jax.model import weights
from fbnet_jax.runtime import parallel

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")  # after a linear warm-up from 0


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed whole)."""
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def create_optimizer(opt_config: ml_collections.ConfigDict,
                     num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and learning-rate schedule of `config.optimizer`."""
    warmup = min(opt_config.warmup_steps, num_steps)
    if opt_config.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, opt_config.learning_rate, warmup_steps=warmup,
            decay_steps=max(num_steps, warmup + 1),  # the total length, warm-up included
            end_value=opt_config.learning_rate * opt_config.end_learning_rate_factor)
    elif opt_config.schedule == "constant":
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, opt_config.learning_rate, max(warmup, 1)),
             optax.constant_schedule(opt_config.learning_rate)], [warmup])
    else:
        raise ValueError(f"unknown schedule {opt_config.schedule!r}; known: {SCHEDULES}")
    if opt_config.name == "adamw":
        tx = optax.adamw(schedule, b1=opt_config.momentum, weight_decay=opt_config.weight_decay)
    elif opt_config.name == "sgd":
        tx = optax.chain(optax.add_decayed_weights(opt_config.weight_decay),
                         optax.sgd(schedule, momentum=opt_config.momentum))
    else:
        raise ValueError(f"unknown optimizer {opt_config.name!r}; known: {OPTIMIZERS}")
    if opt_config.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), tx)
    return tx, schedule


def init_state(model, tx: optax.GradientTransformation, rng: jax.Array,
               image_size: int, backbone: Any = None) -> TrainState:
    """A fresh state: parameters and BatchNorm statistics from `model.init` on a dummy image.

    Args:
      backbone: if given, {"params", "batch_stats"} that replace the backbone's (pretrained
        weights, `models.weights.load_init_from`); the heads keep their fresh values.
    """
    init_rng, train_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros((1, image_size, image_size, 3)), train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    if backbone is not None:
        params = {**params, "backbone": backbone["params"]}
        if backbone["batch_stats"]:
            batch_stats = {**batch_stats, "backbone": backbone["batch_stats"]}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=train_rng)


def model_for(config: ml_collections.ConfigDict):
    """The FaceBehaviorNet a config describes."""
    return models.create_model(config.model, num_aus=len(config.data.aus))


def create_state(config: ml_collections.ConfigDict, mesh, *, abstract: bool = False,
                 init_from: bool = True):
    """The initial train state placed replicated on the mesh (or only its shapes).

    Args:
      config: the experiment config.
      mesh: the device mesh.
      abstract: only shapes (a restore target); nothing is computed or read.
      init_from: load `config.model.init_from` (if set) into the backbone. Pass False when a
        checkpoint will replace the state anyway (a restart), so the file is not read (nor
        needed) again.

    Returns:
      (model, tx, schedule, state) where state is a TrainState of arrays, or of
      `jax.ShapeDtypeStruct` with shardings when `abstract` (a restore target).
    """
    model = model_for(config)
    tx, schedule = create_optimizer(config.optimizer, config.train.num_steps)
    init = jax.jit(lambda rng, backbone: init_state(model, tx, rng, config.data.image_size,
                                                    backbone),
                   out_shardings=parallel.replicated(mesh))
    rng = jax.random.PRNGKey(config.seed)
    if abstract:
        state = jax.eval_shape(init, rng, None)
    else:
        pretrained = None
        if init_from and config.model.init_from not in weights.FRESH:
            pretrained = weights.load_init_from(config.model.init_from, model,
                                                config.data.image_size, config.model.backbone)
            # Placed before the jit so every process passes the same replicated global arrays.
            pretrained = jax.device_put(pretrained, parallel.replicated(mesh))
        state = init(rng, pretrained)
    if abstract:
        state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=parallel.replicated(mesh)), state)
    return model, tx, schedule, state


def problems(config: ml_collections.ConfigDict) -> list[str]:
    """What is wrong with `config.optimizer` (its names and ranges), one line each."""
    out: list[str] = []
    opt = config.optimizer
    checks.one_of(out, "optimizer.name", opt.name, OPTIMIZERS)
    checks.one_of(out, "optimizer.schedule", opt.schedule, SCHEDULES)
    checks.in_range(out, "optimizer.learning_rate", opt.learning_rate, 0, low_open=True)
    checks.in_range(out, "optimizer.warmup_steps", opt.warmup_steps, 0, integer=True)
    checks.in_range(out, "optimizer.end_learning_rate_factor", opt.end_learning_rate_factor, 0,
                    1)
    checks.in_range(out, "optimizer.weight_decay", opt.weight_decay, 0)
    checks.in_range(out, "optimizer.momentum", opt.momentum, 0, 1, high_open=True)
    checks.in_range(out, "optimizer.grad_clip_norm", opt.grad_clip_norm, 0)
    return out


# --- the shapes a config gives the state (a restart against its checkpoint) -------------------

def _abstract_state(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """{leaf path: shape and dtype} of the train state the config creates (nothing computed)."""
    model = model_for(config)
    tx, _ = create_optimizer(config.optimizer, config.train.num_steps)
    shapes = jax.eval_shape(lambda rng: init_state(model, tx, rng, config.data.image_size),
                            jax.random.PRNGKey(0))
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}


def _describe(leaf) -> str:
    return f"{leaf.dtype.name}{list(leaf.shape)}" if leaf is not None else "absent"


def state_differences(before: ml_collections.ConfigDict,
                      after: ml_collections.ConfigDict) -> list[str]:
    """The train state leaves whose shape or dtype differ between two configs, as messages.

    Parameters and BatchNorm statistics come first; the optimizer's copies of them last.
    """
    a, b = _abstract_state(before), _abstract_state(after)
    differ = [p for p in set(a) | set(b)
              if a.get(p) is None or b.get(p) is None or a[p].shape != b[p].shape
              or a[p].dtype != b[p].dtype]
    differ.sort(key=lambda p: (p.startswith("opt_state"), p))
    return [f"{p}: {_describe(a.get(p))} -> {_describe(b.get(p))}" for p in differ]


def shape_change(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                 step: int) -> str | None:
    """None when `config` builds a train state of the checkpoint's shapes, else why not.

    The message names the first leaves that differ and the config fields that change them (each
    differing field is tried alone against the saved config).
    """
    leaves = state_differences(saved, config)
    if not leaves:
        return None
    changed = [d for d in restart.differences(saved, config)
               if not restart.matches(d[0], restart.FREE_FIELDS)]
    culprits = [d for d in changed if len(changed) == 1
                or state_differences(saved, restart.with_field(saved, d[0], d[2]))]
    shown = leaves[:3] + ([f"{len(leaves) - 3} more"] if len(leaves) > 3 else [])
    return (f"the train state in the checkpoint of step {step} has other shapes than this "
            f"config's ({'; '.join(shown)}); changed by "
            f"{'; '.join(restart.format_difference(*d) for d in culprits or changed)}")
