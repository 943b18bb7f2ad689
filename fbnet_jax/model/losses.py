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

The coupling losses (`co_annotation_loss`, `distribution_matching_loss`) tie the tasks together
through an expression-AU relatedness matrix R [7, A] and its prototypical mask P, constants of the
step (`Coupling`; see fbnet_jax/eval/relatedness.py for where they come from).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fbnet_jax.core import checks, relatedness, taxonomy
from fbnet_jax.core.errors import ConfigError

TASK_TERMS = ("expression", "au", "va")
COUPLING_TERMS = ("co_annotation", "distribution_matching")

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


CO_ANNOTATION_AU_TARGETS = ("soft", "hard")


@dataclasses.dataclass(frozen=True)
class Coupling:
    """The constants of the coupling losses.

    Attributes:
      relatedness: R, float [7, A]: R[e, i] is how strongly expression e implies AU i (1 for a
        prototypical AU, the fraction of people who showed an observational one; the Neutral row
        is 0 in Du et al.'s table).
      prototypical: P, bool [7, A]: the AUs that define each expression.
      stop_gradient: distribution matching's targets are constants (True), or gradients reach
        both heads through them (False).
      au_targets: co-annotation's AU targets, "soft" (R[e, i] itself) or "hard" (1, weighted by
        R[e, i]); see `co_annotation_loss`.
    """
    relatedness: np.ndarray
    prototypical: np.ndarray
    stop_gradient: bool = False
    au_targets: str = "hard"

    def __post_init__(self):
        if self.au_targets not in CO_ANNOTATION_AU_TARGETS:
            raise ValueError(f"au_targets must be one of {CO_ANNOTATION_AU_TARGETS}, "
                             f"got {self.au_targets!r}")


def _per_image_mean(values: jax.Array, weights: jax.Array, axis_name: str | None) -> jax.Array:
    """mean over images b with Σ_i w_bi > 0 of [Σ_i w_bi · v_bi / Σ_i w_bi]; 0 without any."""
    total_weight = jnp.sum(weights, axis=-1)
    has_target = (total_weight > 0).astype(jnp.float32)
    # The numerator is 0 where the denominator is, so dividing by 1 there is exact.
    per_image = jnp.sum(weights * values, axis=-1) / jnp.where(total_weight > 0, total_weight, 1.0)
    return _sum(has_target * per_image, axis_name) / jnp.maximum(1.0, _sum(has_target, axis_name))


def co_annotation_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                       coupling: Coupling, axis_name: str | None = None) -> jax.Array:
    """Labels one task implies for images that lack them, as extra targets.

    AU side, for an image with expression label e and each AU i it has no label for:
      "soft" (`coupling.au_targets`): target R[e, i] itself, zeros included: a calibrated
        target, minimised where the AU's probability is the share of people with e who show it;
        L_au = mean over such images of the mean over those AUs of BCE(s_bi, R[e, i]);
      "hard": target 1 with weight w_bi = R[e, i] (nothing where R is 0), normalised per image by
        the total weight: L_au = mean over b with Σ_i w_bi > 0 of
        [Σ_i w_bi · BCE(s_bi, 1) / Σ_i w_bi]. It is minimised at p = 1 for every AU of the row,
        observational ones included.
    Expression side (a choice of ours; the paper gives no formula): an image with at least one AU
    label and no expression label gets expression e when every prototypical AU of e is labelled
    and active, for exactly one e; images that match none or several get nothing:
      L_expr = Σ_b c_b · CE(z_b, e_b) / max(1, Σ_b c_b).
    Returns L_au + L_expr.
    """
    relatedness = jnp.asarray(coupling.relatedness, jnp.float32)
    prototypical = jnp.asarray(coupling.prototypical, jnp.float32)
    expression_mask = batch["expression_mask"].astype(jnp.float32)
    au_mask = batch["au_mask"].astype(jnp.float32)
    expression = jnp.where(expression_mask > 0, batch["expression"], 0).astype(jnp.int32)
    au_logits = outputs["au_logits"].astype(jnp.float32)

    unlabelled = expression_mask[:, None] * (1.0 - au_mask)  # [B, A]
    row = relatedness[expression]                            # [B, A]
    if coupling.au_targets == "soft":
        au_term = _per_image_mean(optax.sigmoid_binary_cross_entropy(au_logits, row),
                                  unlabelled, axis_name)
    else:
        au_term = _per_image_mean(optax.sigmoid_binary_cross_entropy(au_logits,
                                                                     jnp.ones_like(row)),
                                  unlabelled * row, axis_name)

    active = au_mask * jnp.where(au_mask > 0, batch["au"], 0.0).astype(jnp.float32)  # [B, A]
    missing = (1.0 - active) @ prototypical.T  # [B, 7]: prototypical AUs not labelled active
    defined = jnp.sum(prototypical, axis=-1) > 0  # expressions with prototypical AUs
    matches = (missing == 0) & defined[None, :]
    gets_label = ((expression_mask == 0) & (jnp.sum(au_mask, axis=-1) > 0)
                  & (jnp.sum(matches, axis=-1) == 1)).astype(jnp.float32)
    implied = jnp.argmax(matches, axis=-1).astype(jnp.int32)
    expression_term = expression_loss(outputs["expression_logits"], implied, gets_label,
                                      axis_name)
    return au_term + expression_term


def bernoulli_kl(q: jax.Array, logits: jax.Array) -> jax.Array:
    """KL(Bern(q) ‖ Bern(sigmoid(logits))), elementwise, finite for q in [0, 1].

    = BCE(logits, q) − H(q): the cross-entropy less the target's own entropy, so it is 0 exactly
    where sigmoid(logits) = q, whatever q is. x·log x is taken as 0 at x = 0, and its gradient
    there is finite (log of the smallest float32), so a column of the table that is 0 for every
    expression (AU14 in Du et al.'s) gives q = 0 and no NaN.
    """
    tiny = jnp.finfo(jnp.float32).tiny
    neg_entropy = (q * jnp.log(jnp.maximum(q, tiny))
                   + (1.0 - q) * jnp.log(jnp.maximum(1.0 - q, tiny)))
    return optax.sigmoid_binary_cross_entropy(logits, q) + neg_entropy


def distribution_matching_loss(outputs: Mapping[str, jax.Array], coupling: Coupling,
                               axis_name: str | None = None) -> jax.Array:
    """Each head's prediction, mapped through R, matched by the other head (KL divergences).

    On every image, labelled or not, with p = sigmoid(AU logits) and softmax(z) the expression
    distribution:
      AU side: q_bi = Σ_e softmax(z_b)_e · R[e, i]; ℓ_b = mean_i KL(Bern(q_bi) ‖ Bern(p_bi)).
      Expression side: r_b = softmax_e(Σ_i [p_bi log R̃[e, i] + (1 − p_bi) log(1 − R̃[e, i])]),
        R̃ = R clipped to [0.05, 0.95] (Neutral's all-zero row becomes all 0.05): the naive-Bayes
        posterior of the expression given the AU predictions under a uniform prior
        (`taxonomy.au_log_likelihood`, the compound zero-shot rule's likelihood);
        ℓ'_b = KL(r_b ‖ softmax(z_b)).
    L = mean_b (ℓ_b + ℓ'_b).

    Both sides are divergences, never cross-entropies against a target that gradients move: a
    cross-entropy adds the target's entropy, which pays the network for low-entropy targets
    (Neutral with every AU off). Here the term is 0 exactly where the heads agree (q = p and
    r = softmax(z)), for any expression, and its gradient there is 0: it pulls toward no class.
    Each side is a mean (over AUs, over images), so it weighs like a supervised term. With
    `coupling.stop_gradient`, q and r are constants and each head learns only from the other's
    prediction; otherwise (the paper's default) gradients reach both heads through them.
    """
    relatedness = jnp.asarray(coupling.relatedness, jnp.float32)
    au_model = taxonomy.bernoulli_au_model(coupling.relatedness)
    expression_logits = outputs["expression_logits"].astype(jnp.float32)
    au_logits = outputs["au_logits"].astype(jnp.float32)
    targets = (lambda x: jax.lax.stop_gradient(x)) if coupling.stop_gradient else (lambda x: x)

    log_expression = jax.nn.log_softmax(expression_logits)                  # [B, 7]
    au_target = targets(jnp.exp(log_expression) @ relatedness)              # [B, A]
    au_side = jnp.mean(bernoulli_kl(au_target, au_logits), axis=-1)

    log_posterior = targets(jax.nn.log_softmax(
        taxonomy.au_log_likelihood(jax.nn.sigmoid(au_logits), au_model)))  # [B, 7]
    expression_side = jnp.sum(jnp.exp(log_posterior) * (log_posterior - log_expression), axis=-1)

    count = _sum(jnp.ones_like(au_side), axis_name)
    return _sum(au_side + expression_side, axis_name) / count


def task_losses(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                weights: Mapping[str, float], axis_name: str | None = None,
                coupling: Coupling | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted sum of the losses and every term for logging.

    total = Σ_name weights[name] · terms[name] over the task terms "expression", "au" and "va"
    and the coupling terms "co_annotation" and "distribution_matching". A coupling term whose
    weight is 0 or absent is not computed at all, so with both off the loss and its gradients
    are exactly those of the task terms alone.

    Args:
      outputs: model outputs with "expression_logits" [B, 7], "au_logits" [B, A] and "va" [B, 2].
      batch: labels and masks as in `data_pipelines/schema.py`: "expression", "expression_mask",
        "au", "au_mask", "va", "va_mask".
      weights: one float per task term (a missing one is an error, not a default), and optionally
        per coupling term.
      axis_name: pmap axis to sum over, or None (jit, sharded or not).
      coupling: the relatedness constants; needed when a coupling weight is not 0.

    Returns:
      (total, terms) where terms holds each unweighted term that was computed and "total".
    """
    terms = {
        "expression": expression_loss(outputs["expression_logits"], batch["expression"],
                                      batch["expression_mask"], axis_name),
        "au": au_loss(outputs["au_logits"], batch["au"], batch["au_mask"], axis_name),
        "va": va_loss(outputs["va"], batch["va"], batch["va_mask"], axis_name),
    }
    coupled = [name for name in COUPLING_TERMS if weights.get(name, 0.0)]
    if coupled and coupling is None:
        raise ValueError(f"loss weights {coupled} are on but no Coupling was given")
    if "co_annotation" in coupled:
        terms["co_annotation"] = co_annotation_loss(outputs, batch, coupling, axis_name)
    if "distribution_matching" in coupled:
        terms["distribution_matching"] = distribution_matching_loss(outputs, coupling, axis_name)
    total = sum(weights[name] * term for name, term in terms.items())
    return total, {**terms, "total": total}


def problems(config) -> list[str]:
    """What is wrong with `config.loss`, one line each: the terms and their weights, and the
    coupling settings and relatedness table when a coupling term is on."""
    out: list[str] = []
    weights = config.loss.weights
    known = TASK_TERMS + COUPLING_TERMS
    for name in weights.keys():
        if name not in known:
            out.append(f"loss.weights.{name}: not a loss term; the terms are {', '.join(known)}")
        else:
            checks.in_range(out, f"loss.weights.{name}", weights[name], 0)
    missing = [name for name in TASK_TERMS if name not in weights]
    if missing:
        out.append(f"loss.weights: no weight for {', '.join(missing)} (0 turns a term off)")
    if all(isinstance(weights[n], (int, float)) and weights[n] == 0 for n in weights.keys()):
        out.append("loss.weights: all are 0; at least one loss term must be on")
    if any(weights[n] for n in COUPLING_TERMS if n in weights
           and isinstance(weights[n], (int, float))):
        checks.one_of(out, "loss.co_annotation.au_targets", config.loss.co_annotation.au_targets,
                      CO_ANNOTATION_AU_TARGETS)
        if not isinstance(config.loss.distribution_matching.stop_gradient, bool):
            out.append(f"loss.distribution_matching.stop_gradient: must be True or False, "
                       f"got {config.loss.distribution_matching.stop_gradient!r}")
        try:
            relatedness.load(config.loss.relatedness, config.data.aus)
        except ConfigError as e:
            out.extend(e.problems)
    return out
