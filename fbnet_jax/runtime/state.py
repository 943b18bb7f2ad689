"""The train state and how a config creates it (shared by training and evaluation)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from fbnet_jax import model as models
from fbnet_jax.runtime import parallel
from fbnet_jax.model import weights

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
