"""Masked task losses of FaceBehaviorNet (docs/design.md#losses), as pure jax functions.

Every dataset labels only some tasks, so every label comes with a mask (`data_pipelines/schema.py`)
and every loss is a ratio of sums over the batch: Σ (mask · per-example term) / Σ mask, or, for the
concordance correlation coefficient, a function of masked moments. Under `jax.jit` on a batch
sharded over devices the sums are global, so the loss is exactly the loss of the global batch. For
`jax.pmap` users each function takes `axis_name`; the sums are then `lax.psum`-ed over that axis and
every device gets the global loss.

Note on gradients under pmap: `jax.grad` transposes `psum` into `psum`, so the gradient each device
gets is `axis_size` times the gradient of the global loss. The usual pmap step, which takes
`lax.pmean` of the parameter gradients, divides that factor out again and is exact.

Masked-out label values are replaced by 0 before they are used, so whatever they hold (even NaN)
changes neither the loss nor its gradient. A task without any labelled example in the batch
contributes 0 with zero gradient.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

# Added to the CCC denominator var(x) + var(y) + (mean x - mean y)^2. That denominator is 0 only
# when predictions and targets are both constant and equal (or fewer than one example is
# labelled); the CCC is then 0 instead of 0/0, and its gradient stays finite. For any batch whose
# denominator is larger than ~1e-6 the term is below float32 resolution, so the CCC is unchanged.
CCC_EPSILON = 1e-8


def _sum(x: jax.Array, axis_name: str | None, axis: int | None = None) -> jax.Array:
    """Sums `x` over `axis` (every axis when None), then across devices when `axis_name` is set."""
    total = jnp.sum(x, axis=axis)
    return total if axis_name is None else jax.lax.psum(total, axis_name)


def expression_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                    axis_name: str | None = None) -> jax.Array:
    """Softmax cross-entropy averaged over the expression-labelled examples.

    L = Σ_b m_b · CE(z_b, y_b) / max(1, Σ_b m_b).

    Args:
      logits: [B, C] expression logits.
      labels: int [B] class indices; values where `mask` is 0 are ignored.
      mask: [B], 1 where the example has an expression label.
      axis_name: pmap axis to sum over, or None.

    Returns:
      A float32 scalar; 0 when no example is labelled.
    """
    mask = mask.astype(jnp.float32)
    # An out-of-range label on a masked row would make take_along_axis return NaN.
    labels = jnp.where(mask > 0, labels, 0).astype(jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return _sum(mask * ce, axis_name) / jnp.maximum(1.0, _sum(mask, axis_name))


def au_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array,
            axis_name: str | None = None) -> jax.Array:
    """Binary cross-entropy normalised per image by its number of labelled AUs (the paper's form).

    L = mean over images b with Σ_i m_bi > 0 of [Σ_i m_bi · BCE(s_bi, u_bi) / Σ_i m_bi], so an image
    from a dataset that labels 8 AUs weighs as much as one from a dataset that labels 12.

    Args:
      logits: [B, A] AU logits.
      labels: [B, A] in {0, 1}; values where `mask` is 0 are ignored.
      mask: [B, A], 1 where the AU is labelled for that image.
      axis_name: pmap axis to sum over, or None.

    Returns:
      A float32 scalar; 0 when no AU is labelled in the batch.
    """
    mask = mask.astype(jnp.float32)
    labels = jnp.where(mask > 0, labels, 0.0).astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels)
    labelled_aus = jnp.sum(mask, axis=-1)
    has_label = (labelled_aus > 0).astype(jnp.float32)
    # The per-image ratio needs no cross-device sum: it involves one image only. Its numerator is
    # 0 where the denominator is, so dividing by 1 there is exact and keeps the gradient finite.
    per_image = jnp.sum(mask * bce, axis=-1) / jnp.where(labelled_aus > 0, labelled_aus, 1.0)
    return (_sum(has_label * per_image, axis_name)
            / jnp.maximum(1.0, _sum(has_label, axis_name)))


def ccc(pred: jax.Array, target: jax.Array, mask: jax.Array,
        axis_name: str | None = None) -> jax.Array:
    """Concordance correlation coefficient of each column over the masked rows.

    CCC = 2 cov(x, y) / (var x + var y + (mean x - mean y)^2 + CCC_EPSILON), with population
    (divide-by-n) moments. The moments are computed in two passes (means first, then centred sums)
    for float32 accuracy; both passes are sums over the batch, so the result is exact on a sharded
    batch. With no labelled row, one labelled row, or constant equal columns the CCC is 0.

    Args:
      pred: [B, D] predictions.
      target: [B, D] targets; rows where `mask` is 0 are ignored.
      mask: [B], 1 where the row is labelled.
      axis_name: pmap axis to sum over, or None.

    Returns:
      float32 [D].
    """
    mask = mask.astype(jnp.float32)[:, None]
    pred = pred.astype(jnp.float32)
    target = jnp.where(mask > 0, target, 0.0).astype(jnp.float32)
    count = jnp.maximum(1.0, _sum(mask, axis_name, axis=0))
    mean_x = _sum(mask * pred, axis_name, axis=0) / count
    mean_y = _sum(mask * target, axis_name, axis=0) / count
    dx = mask * (pred - mean_x)
    dy = mask * (target - mean_y)
    var_x = _sum(dx * dx, axis_name, axis=0) / count
    var_y = _sum(dy * dy, axis_name, axis=0) / count
    cov = _sum(dx * dy, axis_name, axis=0) / count
    return 2.0 * cov / (var_x + var_y + (mean_x - mean_y) ** 2 + CCC_EPSILON)


def va_loss(pred: jax.Array, target: jax.Array, mask: jax.Array,
            axis_name: str | None = None) -> jax.Array:
    """1 - (CCC_valence + CCC_arousal) / 2 over the VA-labelled images; 0 when there are none.

    Args:
      pred: [B, 2] (valence, arousal) predictions.
      target: [B, 2] targets; rows where `mask` is 0 are ignored.
      mask: [B], 1 where the image has a VA label.
      axis_name: pmap axis to sum over, or None.

    Returns:
      A float32 scalar.
    """
    has_label = (_sum(mask.astype(jnp.float32), axis_name) > 0).astype(jnp.float32)
    # Without the gate an unlabelled batch would cost 1 (CCC 0); both factors are finite, so the
    # product's gradient is exactly 0 there.
    return has_label * (1.0 - jnp.mean(ccc(pred, target, mask, axis_name)))


def task_losses(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                weights: Mapping[str, float], axis_name: str | None = None,
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted sum of the task losses and every term for logging.

    total = Σ_name weights[name] · terms[name] over the three task terms "expression", "au" and
    "va".

    Args:
      outputs: model outputs with "expression_logits" [B, 7], "au_logits" [B, A] and "va" [B, 2].
      batch: labels and masks as in `data_pipelines/schema.py`: "expression", "expression_mask",
        "au", "au_mask", "va", "va_mask".
      weights: one float per term name; a missing name is an error, not a default.
      axis_name: pmap axis to sum over, or None (jit, sharded or not).

    Returns:
      (total, terms) where terms holds each unweighted term and "total".
    """
    terms = {
        "expression": expression_loss(outputs["expression_logits"], batch["expression"],
                                      batch["expression_mask"], axis_name),
        "au": au_loss(outputs["au_logits"], batch["au"], batch["au_mask"], axis_name),
        "va": va_loss(outputs["va"], batch["va"], batch["va_mask"], axis_name),
    }
    total = sum(weights[name] * term for name, term in terms.items())
    return total, {**terms, "total": total}
