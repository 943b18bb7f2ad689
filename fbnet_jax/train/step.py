"""The train step: a pure function `(state, batch) -> (state, metrics.StepMeans)`.

`make_train_step` builds it from the model, the optimizer and the loss weights; the loop
(fbnet_jax/train/loop.py) compiles it with `parallel.StepRunner` over a mesh of all devices.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from data_pipelines import device_augment
from fbnet_jax.eval import metrics as metrics_lib
from fbnet_jax.core import relatedness
from fbnet_jax.model import losses
from fbnet_jax.runtime.state import TrainState


def coupling_for(config: ml_collections.ConfigDict) -> losses.Coupling | None:
    """The constants of the coupling losses (None when both coupling weights are 0)."""
    weights = config.loss.weights
    if not any(weights.get(name, 0.0) for name in losses.COUPLING_TERMS):
        return None
    table = relatedness.load(config.loss.relatedness, config.data.aus)
    return losses.Coupling(table.matrix, table.prototypical,
                           stop_gradient=config.loss.distribution_matching.stop_gradient,
                           au_targets=config.loss.co_annotation.au_targets)


# Model outputs the losses read (the features stay inside the step).
LOSS_OUTPUTS = ("expression_logits", "au_logits", "va")
NONFINITE_POLICIES = ("stop", "skip")


def make_train_step(model, tx: optax.GradientTransformation, loss_weights: Mapping[str, float],
                    coupling: losses.Coupling | None = None, *, axis_name: str | None = None,
                    grad_accum_steps: int = 1, nonfinite: str = "stop",
                    augment: device_augment.DeviceAugment | None = None, seed: int = 0):
    """Returns the pure step `(state, batch) -> (state, metrics.StepMeans)`.

    Compile it with `parallel.StepRunner` (jit over the mesh, or pmap).

    Args:
      model: the FaceBehaviorNet; under pmap, built with `bn_axis_name=axis_name`.
      tx: the optimizer.
      loss_weights: `config.loss.weights`.
      coupling: the relatedness constants of the coupling losses (`coupling_for(config)`).
      axis_name: the pmap axis (None under jit): the losses psum their sums over it, gradients
        are pmean-ed over it (see fbnet_jax/model/losses.py on why that is exact), and each device
        draws its own dropout masks.
      grad_accum_steps: K > 1 splits the batch into K microbatches (row j of every K on each
        device) and computes the gradient of the loss of the whole batch in two passes: a
        forward pass of each microbatch gives the outputs of the whole batch, the loss and its
        gradient with respect to those outputs are computed at once (the losses are ratios of
        batch sums and CCC moments, so averaging per-microbatch losses would not give the
        batch's loss), then a forward and backward pass of each microbatch pulls that gradient
        back to the parameters. Activations of one microbatch at a time are kept; the cost is
        one extra forward pass. BatchNorm normalises each microbatch by its own statistics and
        updates its running averages once per microbatch (K times per step).
      nonfinite: "stop" applies every update (the loop stops the run when it sees a non-finite
        loss); "skip" keeps the state as it was when the loss or the gradient norm is not
        finite, and the step counts as skipped in the metrics.
      augment, seed: a uint8 batch image (the pipeline's) is augmented on the device, each
        example with its key from (seed, the state's step, the batch's `row`), then normalised;
        without `augment` only normalised. A float batch image is taken as the model input
        already (a benchmark's resident batch).
    """
    weights = dict(loss_weights)
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"unknown nonfinite policy {nonfinite!r}; known: {NONFINITE_POLICIES}")

    def forward(params, batch_stats, images, rng):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True,
            rngs={"dropout": rng}, mutable=["batch_stats"])
        return {k: outputs[k] for k in LOSS_OUTPUTS}, updates.get("batch_stats", {})

    def batch_loss(outputs, batch):
        return losses.task_losses(outputs, batch, weights, axis_name=axis_name, coupling=coupling)

    def whole_batch(state, batch, rng):
        def loss_fn(params):
            outputs, batch_stats = forward(params, state.batch_stats, batch["image"], rng)
            total, terms = batch_loss(outputs, batch)
            return total, (terms, batch_stats)
        (_, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return terms, grads, batch_stats

    def accumulated(state, batch, rng):
        k = grad_accum_steps
        micro = jax.tree.map(lambda x: _microbatches(x, k), batch)
        rngs = jax.vmap(lambda j: jax.random.fold_in(rng, j))(jnp.arange(k))
        outputs = jax.lax.map(lambda xs: forward(state.params, state.batch_stats, *xs)[0],
                              (micro["image"], rngs))
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731  [K, b, ...] -> [K * b, ...]
        (_, terms), output_grads = jax.value_and_grad(batch_loss, has_aux=True)(
            jax.tree.map(flat, outputs), jax.tree.map(flat, micro))
        output_grads = jax.tree.map(lambda g: g.reshape(k, -1, *g.shape[1:]), output_grads)

        def pull_back(carry, xs):
            grads, batch_stats = carry
            images, rng_j, grads_j = xs
            _, vjp, batch_stats = jax.vjp(lambda p: forward(p, batch_stats, images, rng_j),
                                          state.params, has_aux=True)
            return (jax.tree.map(jnp.add, grads, vjp(grads_j)[0]), batch_stats), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, batch_stats), _ = jax.lax.scan(
            pull_back, (zeros, state.batch_stats), (micro["image"], rngs, output_grads))
        return terms, grads, batch_stats

    def model_input(state: TrainState, batch: Mapping[str, jax.Array]) -> jax.Array:
        images = batch["image"]
        if images.dtype != jnp.uint8:
            return images
        if augment is None:
            return device_augment.normalize(images)
        return augment.augment(images, device_augment.example_keys(seed, state.step,
                                                                   batch["row"]))

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        batch = {**batch, "image": model_input(state, batch)}
        rng = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        run = accumulated if grad_accum_steps > 1 else whole_batch
        terms, grads, batch_stats = run(state, batch, rng)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state)
        keep = jnp.isfinite(terms["total"]) & jnp.isfinite(grad_norm)
        if nonfinite == "skip":
            new_state = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_state,
                                     state.replace(step=state.step + 1))
        scalars = {f"loss/{name}": value for name, value in terms.items()}
        scalars["grad_norm"] = grad_norm
        return new_state, metrics_lib.StepMeans.from_step(scalars, keep)

    return train_step


def _microbatches(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [K, B / K, ...], microbatch j holding rows j, j + K, j + 2K, ...

    Strided rather than contiguous, so that on a batch sharded over devices in contiguous
    blocks each microbatch takes the same number of rows from every device (no data moves).
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
