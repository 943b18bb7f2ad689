"""Exact-value tests of the masked task losses, their gradients, and their sharding invariance."""

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbnet_jax.model import losses
from fbnet_jax.core import taxonomy

WEIGHTS = {"expression": 1.0, "au": 1.0, "va": 1.0}


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _bce(logit, label):
    return -(label * _log_sigmoid(logit) + (1 - label) * _log_sigmoid(-logit))


def _cross_entropy(logits, label):
    return math.log(sum(math.exp(z) for z in logits)) - logits[label]


def _batch(seed, batch_size=8, num_aus=17):
    """Random outputs and a partially labelled batch (every task has some labels)."""
    rng = np.random.default_rng(seed)
    outputs = {
        "expression_logits": rng.normal(size=(batch_size, 7)).astype(np.float32),
        "au_logits": rng.normal(size=(batch_size, num_aus)).astype(np.float32),
        "va": np.tanh(rng.normal(size=(batch_size, 2))).astype(np.float32),
    }
    expression_mask = (np.arange(batch_size) % 3 != 1).astype(np.float32)
    au_mask = (rng.random((batch_size, num_aus)) < 0.6).astype(np.float32)
    au_mask[1] = 0.0
    va_mask = (np.arange(batch_size) % 2 == 0).astype(np.float32)
    batch = {
        "expression": np.where(expression_mask > 0, rng.integers(0, 7, batch_size), 0
                               ).astype(np.int32),
        "expression_mask": expression_mask,
        "au": ((rng.random((batch_size, num_aus)) < 0.4) * au_mask).astype(np.float32),
        "au_mask": au_mask,
        "va": (rng.uniform(-1, 1, (batch_size, 2)) * va_mask[:, None]).astype(np.float32),
        "va_mask": va_mask,
    }
    return outputs, batch


def _loss_and_grad(outputs, batch, weights=WEIGHTS):
    def total(o):
        return losses.task_losses(o, batch, weights)[0]
    return jax.value_and_grad(total)(outputs)


def test_expression_loss_averages_over_labelled_examples():
    logits = np.array([[2.0, 1.0, 0.0, -1.0, 0.5, 0.0, 3.0],
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                       [-1.0, 4.0, 0.5, 0.5, 0.0, 1.0, -2.0],
                       [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 9.0]], np.float32)
    labels = np.array([6, 3, 2, 0], np.int32)
    mask = np.array([1, 0, 1, 0], np.float32)
    expected = (_cross_entropy(logits[0].tolist(), 6) + _cross_entropy(logits[2].tolist(), 2)) / 2
    loss = losses.expression_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_au_loss_normalises_per_image_then_averages_over_labelled_images():
    logits = np.array([[1.0, -2.0, 0.5],
                       [3.0, 0.0, -1.0],
                       [0.2, 0.3, 0.4],
                       [-0.5, 2.0, 1.5]], np.float32)
    labels = np.array([[1, 0, 1], [0, 0, 0], [0, 0, 0], [0, 1, 0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1]], np.float32)
    image_0 = (_bce(1.0, 1) + _bce(-2.0, 0) + _bce(0.5, 1)) / 3
    image_1 = _bce(3.0, 0) / 1
    image_3 = (_bce(2.0, 1) + _bce(1.5, 0)) / 2
    expected = (image_0 + image_1 + image_3) / 3  # image 2 has no AU label
    loss = losses.au_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    # Pooling all labelled pairs would weigh image 0 three times as much as image 1.
    pooled = (3 * image_0 + image_1 + 2 * image_3) / 6
    assert abs(float(loss) - pooled) > 1e-3


def test_ccc_and_va_loss_from_population_moments():
    pred = np.array([[0.1, -0.3], [0.4, 0.2], [0.9, 0.9], [-0.2, 0.0], [0.3, 0.5]], np.float32)
    target = np.array([[0.0, -0.5], [0.5, 0.1], [-1.0, -1.0], [-0.4, 0.3], [0.2, 0.6]],
                      np.float32)
    mask = np.array([1, 1, 0, 1, 1], np.float32)
    x, y = pred[mask > 0].astype(np.float64), target[mask > 0].astype(np.float64)
    n = len(x)
    mean_x, mean_y = x.sum(0) / n, y.sum(0) / n
    var_x = ((x - mean_x) ** 2).sum(0) / n
    var_y = ((y - mean_y) ** 2).sum(0) / n
    cov = ((x - mean_x) * (y - mean_y)).sum(0) / n
    expected = 2 * cov / (var_x + var_y + (mean_x - mean_y) ** 2)
    value = losses.ccc(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(
        losses.va_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask)),
        1 - expected.mean(), rtol=1e-5)


def test_ccc_is_one_for_identical_and_minus_one_for_negated_zero_mean_columns():
    x = np.linspace(-0.9, 0.9, 6).reshape(3, 2)
    x = jnp.asarray(x - x.mean(axis=0), jnp.float32)
    ones = jnp.ones(3)
    np.testing.assert_allclose(losses.ccc(x, x, ones), [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(losses.ccc(x, -x, ones), [-1.0, -1.0], rtol=1e-6)


def test_task_losses_weights_terms_and_total():
    outputs, batch = _batch(0)
    weights = {"expression": 2.0, "au": 0.5, "va": 3.0}
    total, terms = losses.task_losses(outputs, batch, weights)
    assert set(terms) == {"expression", "au", "va", "total"}
    np.testing.assert_allclose(terms["expression"], losses.expression_loss(
        outputs["expression_logits"], batch["expression"], batch["expression_mask"]))
    np.testing.assert_allclose(terms["au"], losses.au_loss(
        outputs["au_logits"], batch["au"], batch["au_mask"]))
    np.testing.assert_allclose(terms["va"], losses.va_loss(
        outputs["va"], batch["va"], batch["va_mask"]))
    expected = 2.0 * terms["expression"] + 0.5 * terms["au"] + 3.0 * terms["va"]
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    np.testing.assert_allclose(terms["total"], total)
    with pytest.raises(KeyError):
        losses.task_losses(outputs, batch, {"expression": 1.0, "au": 1.0})


def test_unlabelled_batch_gives_zero_losses_and_zero_finite_gradients():
    outputs, batch = _batch(1)
    batch = {name: np.zeros_like(value) for name, value in batch.items()}
    value, grads = _loss_and_grad(outputs, batch)
    _, terms = losses.task_losses(outputs, batch, WEIGHTS)
    assert float(value) == 0.0
    assert all(float(term) == 0.0 for term in terms.values())
    for grad in grads.values():
        assert np.all(np.isfinite(grad)) and not np.any(grad)


def test_each_unlabelled_task_contributes_nothing():
    outputs, batch = _batch(2)
    for task, mask_name in (("expression", "expression_mask"), ("au", "au_mask"),
                            ("va", "va_mask")):
        unlabelled = dict(batch, **{mask_name: np.zeros_like(batch[mask_name])})
        value, grads = _loss_and_grad(outputs, unlabelled,
                                      {name: float(name == task) for name in WEIGHTS})
        assert float(value) == 0.0
        assert all(np.all(np.isfinite(g)) and not np.any(g) for g in grads.values())


def test_masked_label_values_change_nothing():
    outputs, batch = _batch(3)
    garbage = dict(batch)
    garbage["expression"] = np.where(batch["expression_mask"] > 0, batch["expression"], -1
                                     ).astype(np.int32)
    garbage["expression"][np.flatnonzero(batch["expression_mask"] == 0)[:1]] = 99
    garbage["au"] = np.where(batch["au_mask"] > 0, batch["au"], np.nan).astype(np.float32)
    garbage["au"][1] = 1.0
    garbage["va"] = np.where(batch["va_mask"][:, None] > 0, batch["va"], np.nan
                             ).astype(np.float32)
    garbage["va"][1] = 5.0
    value, grads = _loss_and_grad(outputs, batch)
    garbage_value, garbage_grads = _loss_and_grad(outputs, garbage)
    assert float(value) == float(garbage_value)
    for name in grads:
        np.testing.assert_array_equal(grads[name], garbage_grads[name])


@pytest.mark.parametrize("case", ["one_labelled", "constant_equal", "constant_pred"])
def test_degenerate_va_batches_have_finite_loss_and_gradients(case):
    target = np.array([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.6], [0.0, 0.0]], np.float32)
    pred = np.array([[0.2, 0.1], [0.0, 0.5], [-0.4, 0.7], [0.9, 0.9]], np.float32)
    mask = np.array([1, 1, 1, 0], np.float32)
    if case == "one_labelled":
        mask = np.array([0, 1, 0, 0], np.float32)
    elif case == "constant_equal":
        pred = np.full_like(pred, 0.25)
        target = np.full_like(target, 0.25)
    else:
        pred = np.full_like(pred, 0.25)
    value, grad = jax.value_and_grad(losses.va_loss)(pred, target, mask)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
    if case != "constant_pred":
        # CCC is 0 when both variances and the mean difference vanish (the epsilon case).
        np.testing.assert_allclose(value, 1.0)


def test_extreme_logits_stay_finite():
    outputs, batch = _batch(4)
    outputs = dict(outputs, expression_logits=outputs["expression_logits"] * 1e4,
                   au_logits=outputs["au_logits"] * 1e4)
    value, grads = _loss_and_grad(outputs, batch)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(g)) for g in grads.values())


def test_bfloat16_outputs_give_float32_losses():
    outputs, batch = _batch(5)
    outputs = {name: jnp.asarray(value, jnp.bfloat16) for name, value in outputs.items()}
    total, terms = losses.task_losses(outputs, batch, WEIGHTS)
    assert total.dtype == jnp.float32 and all(t.dtype == jnp.float32 for t in terms.values())


def test_jit_matches_eager_on_one_device():
    outputs, batch = _batch(6)
    eager_value, eager_grads = _loss_and_grad(outputs, batch)
    jit_value, jit_grads = jax.jit(_loss_and_grad)(outputs, batch)
    np.testing.assert_allclose(jit_value, eager_value, rtol=1e-6)
    for name in eager_grads:
        np.testing.assert_allclose(jit_grads[name], eager_grads[name], rtol=1e-5, atol=1e-7)


# Runs in a fresh interpreter: the device count is fixed when jax starts. Compares the loss and its
# gradient w.r.t. the outputs on one device with (a) jit on the batch sharded P("data") over 8
# devices and (b) pmap with axis_name over the same 8 devices. The masks leave some shards without
# any label of a task, so local sums of 0 are exercised.
_MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests_dir!r})
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from fbnet_jax.model import losses
    from fbnet_jax.core import taxonomy
    from test_losses import WEIGHTS, _batch

    devices = jax.devices()
    assert len(devices) == 8, devices
    outputs, batch = _batch(7, batch_size=16)
    batch["expression_mask"][:6] = 0.0   # shards 0-2: no expression label
    batch["va_mask"][8:] = 0.0           # shards 4-7: no VA label
    batch["au_mask"][2:4] = 0.0          # shard 1: no AU label

    coupling = losses.Coupling(taxonomy.basic_relatedness(),
                               taxonomy.prototypical_mask(taxonomy.EXPRESSIONS))
    coupled = dict(WEIGHTS, co_annotation=1.0, distribution_matching=1.0)
    # Two AU-only rows on shards 5 and 6 that co-annotation labels Happiness (AUs 12, 25).
    for row in (10, 13):
        batch["expression_mask"][row] = 0.0
        batch["au_mask"][row] = 1.0
        batch["au"][row] = 0.0
        batch["au"][row, [taxonomy.AUS.index(12), taxonomy.AUS.index(25)]] = 1.0

    soft = losses.Coupling(coupling.relatedness, coupling.prototypical, au_targets="soft")
    for weights, coupling in ((WEIGHTS, coupling), (coupled, coupling), (coupled, soft)):
        def loss_and_grad(outputs, batch, axis_name=None):
            def total(o):
                return losses.task_losses(o, batch, weights, axis_name, coupling=coupling)
            (value, terms), grads = jax.value_and_grad(total, has_aux=True)(outputs)
            return terms, grads

        one = jax.device_put((outputs, batch), devices[0])
        single_terms, single_grads = jax.jit(loss_and_grad)(*one)

        mesh = Mesh(np.array(devices), ("data",))
        sharded = jax.device_put((outputs, batch), NamedSharding(mesh, P("data")))
        jit_terms, jit_grads = jax.jit(loss_and_grad)(*sharded)
        assert jit_grads["va"].sharding.spec == P("data"), jit_grads["va"].sharding

        split = jax.tree.map(lambda x: x.reshape((8, -1) + x.shape[1:]), (outputs, batch))
        pmap_terms, pmap_grads = jax.pmap(
            lambda o, b: loss_and_grad(o, b, "data"), axis_name="data")(*split)

        for name, value in single_terms.items():
            np.testing.assert_allclose(jit_terms[name], value, rtol=1e-5, err_msg=name)
            np.testing.assert_allclose(pmap_terms[name], np.full(8, value), rtol=1e-5,
                                       err_msg=name)
        for name, grad in single_grads.items():
            np.testing.assert_allclose(jit_grads[name], grad, rtol=1e-4, atol=1e-7, err_msg=name)
            # grad transposes psum into psum: each device holds 8x its slice of the global
            # gradient.
            np.testing.assert_allclose(np.asarray(pmap_grads[name]).reshape(grad.shape) / 8,
                                       grad, rtol=1e-4, atol=1e-7, err_msg=name)
        print("ok", {{name: float(value) for name, value in single_terms.items()}})
""")


def test_losses_are_exact_on_a_batch_sharded_over_8_devices_and_under_pmap():
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", _MULTI_DEVICE_SCRIPT.format(tests_dir=tests_dir)],
        env=env, capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(tests_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    plain, hard, soft = result.stdout.splitlines()
    assert all(line.startswith("ok") for line in (plain, hard, soft)), result.stdout
    for coupled in (hard, soft):
        assert "'co_annotation'" in coupled and "'distribution_matching'" in coupled
    assert hard != soft  # the co-annotation targets differ


# --- coupling losses ------------------------------------------------------------------------

# A hand-made table over 4 AUs. Rows: Neutral, Anger, Disgust, Fear, Happiness, Sadness, Surprise.
R4 = np.array([[0.0, 0.0, 0.0, 0.0],
               [1.0, 0.0, 0.5, 0.0],
               [0.0, 1.0, 0.0, 0.0],
               [0.0, 0.0, 0.0, 0.0],   # no relation: excluded from the expression side
               [0.0, 0.0, 1.0, 1.0],
               [1.0, 0.0, 0.0, 0.25],
               [0.0, 1.0, 1.0, 0.0]], np.float32)
P4 = R4 == 1.0
COUPLING4 = losses.Coupling(R4, P4)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_co_annotation_gives_expression_only_images_the_tables_aus_with_their_weights():
    au_logits = np.array([[0.3, -1.2, 0.7, 2.0], [1.5, 0.1, -0.4, -2.0],
                          [0.2, 0.2, 0.2, 0.2]], np.float32)
    outputs = {"au_logits": au_logits, "expression_logits": np.zeros((3, 7), np.float32)}
    batch = {"expression": np.array([1, 5, 4], np.int32),
             "expression_mask": np.array([1, 1, 0], np.float32),  # row 2: no expression label
             "au": np.zeros((3, 4), np.float32),
             "au_mask": np.array([[0, 0, 1, 0],   # Anger; AU 3 labelled: only AU 1 (w 1) left
                                  [0, 1, 1, 0],   # Sadness: AUs 1 (w 1) and 4 (w 0.25)
                                  [0, 0, 0, 0]], np.float32)}
    row0 = _bce(0.3, 1)  # R[Anger] = (1, 0, 0.5, 0); AU 3 is labelled, so only AU 1
    row1 = (1.0 * _bce(1.5, 1) + 0.25 * _bce(-2.0, 1)) / 1.25
    expected = (row0 + row1) / 2
    value = losses.co_annotation_loss(outputs, batch, COUPLING4)
    assert float(value) == pytest.approx(expected, rel=1e-6)


def test_soft_co_annotation_targets_every_unlabelled_au_with_its_table_entry():
    au_logits = np.array([[0.3, -1.2, 0.7, 2.0], [1.5, 0.1, -0.4, -2.0],
                          [0.2, 0.2, 0.2, 0.2], [0.5, 0.5, 0.5, 0.5]], np.float32)
    outputs = {"au_logits": au_logits, "expression_logits": np.zeros((4, 7), np.float32)}
    batch = {"expression": np.array([1, 5, 4, 0], np.int32),
             "expression_mask": np.array([1, 1, 0, 1], np.float32),  # row 2: no expression
             "au": np.zeros((4, 4), np.float32),
             "au_mask": np.array([[0, 0, 1, 0],   # Anger (1, 0, 0.5, 0): AUs 1, 2, 4
                                  [0, 1, 1, 0],   # Sadness (1, 0, 0, 0.25): AUs 1 and 4
                                  [0, 0, 0, 0],
                                  [1, 1, 1, 1]],  # Neutral, every AU labelled: nothing implied
                                 np.float32)}
    row0 = (_bce(0.3, 1.0) + _bce(-1.2, 0.0) + _bce(2.0, 0.0)) / 3   # zeros are targets too
    row1 = (_bce(1.5, 1.0) + _bce(-2.0, 0.25)) / 2                    # a calibrated 0.25
    soft = losses.Coupling(R4, P4, au_targets="soft")
    value = losses.co_annotation_loss(outputs, batch, soft)
    assert float(value) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # Neutral's all-zero row with its AUs unlabelled: every AU is a target 0.
    batch["au_mask"][3] = 0.0
    row3 = sum(_bce(0.5, 0.0) for _ in range(4)) / 4
    value = losses.co_annotation_loss(outputs, batch, soft)
    assert float(value) == pytest.approx((row0 + row1 + row3) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="au_targets must be one of"):
        losses.Coupling(R4, P4, au_targets="sofft")


@pytest.mark.parametrize("active, implied", [
    ([1, 0, 1, 0], None),   # AU 1 completes Anger and Sadness (both {1}): ambiguous
    ([0, 1, 0, 0], 2),      # Disgust {2}; Surprise {2, 3} is incomplete
    ([0, 0, 1, 1], 4),      # Happiness: AUs 3 and 4, the only complete prototypical set
    ([0, 1, 1, 1], None),   # Happiness and Surprise (AUs 2, 3) both complete: ambiguous
    ([0, 0, 0, 0], None),   # nothing active
])
def test_co_annotation_gives_au_only_images_the_one_matching_expression(active, implied):
    # Prototypical sets: Anger {1}, Disgust {2}, Happiness {3, 4}, Sadness {1}, Surprise {2, 3}.
    logits = np.array([[0.5, -0.3, 1.2, 0.1, 2.0, -1.0, 0.4]], np.float32)
    outputs = {"au_logits": np.zeros((1, 4), np.float32), "expression_logits": logits}
    batch = {"expression": np.zeros(1, np.int32), "expression_mask": np.zeros(1, np.float32),
             "au": np.array([active], np.float32), "au_mask": np.ones((1, 4), np.float32)}
    value = float(losses.co_annotation_loss(outputs, batch, COUPLING4))
    expected = 0.0 if implied is None else _cross_entropy(logits[0].tolist(), implied)
    assert value == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_co_annotation_needs_the_prototypical_aus_labelled():
    # Happiness needs AUs 3 and 4 active and labelled; AU 4 unlabelled (though 1): no label.
    outputs = {"au_logits": np.zeros((1, 4), np.float32),
               "expression_logits": np.zeros((1, 7), np.float32)}
    batch = {"expression": np.zeros(1, np.int32), "expression_mask": np.zeros(1, np.float32),
             "au": np.array([[0, 0, 1, 1]], np.float32),
             "au_mask": np.array([[1, 1, 1, 0]], np.float32)}
    assert float(losses.co_annotation_loss(outputs, batch, COUPLING4)) == 0.0


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _dm_by_hand(z, s, table):
    """Distribution matching of one image, written out with loops (docs/design.md#losses)."""
    pe = [math.exp(v) for v in z]
    pe = [v / sum(pe) for v in pe]
    p = [_sigmoid(v) for v in s]
    num_aus = len(s)
    q = [sum(pe[e] * table[e][i] for e in range(7)) for i in range(num_aus)]

    def xlogy(x, y):
        return 0.0 if x == 0 else x * math.log(y)

    au_side = sum(xlogy(q[i], q[i]) - xlogy(q[i], p[i]) + xlogy(1 - q[i], 1 - q[i])
                  - xlogy(1 - q[i], 1 - p[i]) for i in range(num_aus)) / num_aus
    clipped = [[min(max(v, 0.05), 0.95) for v in row] for row in table]
    scores = [sum(p[i] * math.log(clipped[e][i]) + (1 - p[i]) * math.log(1 - clipped[e][i])
                  for i in range(num_aus)) for e in range(7)]
    norm = sum(math.exp(v) for v in scores)
    r = [math.exp(v) / norm for v in scores]
    expression_side = sum(r[e] * math.log(r[e] / pe[e]) for e in range(7))
    return au_side + expression_side


def test_distribution_matching_in_both_directions_by_hand():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(3, 7)).astype(np.float32)
    s = rng.normal(size=(3, 4)).astype(np.float32)
    value = losses.distribution_matching_loss({"expression_logits": z, "au_logits": s},
                                              COUPLING4)
    expected = np.mean([_dm_by_hand(z[b].tolist(), s[b].tolist(), R4.tolist()) for b in range(3)])
    assert float(value) == pytest.approx(expected, rel=1e-5)
    stopped = losses.distribution_matching_loss({"expression_logits": z, "au_logits": s},
                                                losses.Coupling(R4, P4, stop_gradient=True))
    assert float(stopped) == float(value)  # the same value; only the gradients differ


def test_the_expression_side_scores_with_the_table_clipped_to_5_and_95_percent():
    # Neutral's all-zero row is all 0.05, a prototypical AU 0.95, an observational one itself.
    model = taxonomy.bernoulli_au_model(R4)
    np.testing.assert_array_equal(model[0], [0.05] * 4)
    np.testing.assert_array_equal(model[1], [0.95, 0.05, 0.5, 0.05])
    np.testing.assert_array_equal(model[5], [0.95, 0.05, 0.05, 0.25])
    p = np.array([[0.9, 0.2, 0.6, 0.1]])
    by_hand = [sum(p[0, i] * math.log(model[e, i]) + (1 - p[0, i]) * math.log(1 - model[e, i])
                   for i in range(4)) for e in range(7)]
    np.testing.assert_allclose(taxonomy.au_log_likelihood(p, model)[0], by_hand, rtol=1e-12)
    # The jax path of the same function (inside the loss) keeps float32 and agrees.
    in_jax = taxonomy.au_log_likelihood(jnp.asarray(p, jnp.float32), model)
    assert in_jax.dtype == jnp.float32
    np.testing.assert_allclose(in_jax[0], by_hand, rtol=1e-6)


def _agreeing_heads(expression, table, iterations=200):
    """Logits at which the two heads agree, dominated by `expression`.

    Iterates softmax(z) <- posterior(softmax(z) @ R) from a one-hot start: its fixed point is a
    pair of heads each of which predicts what the other implies (q = p and r = softmax(z)).
    """
    model = taxonomy.bernoulli_au_model(table)
    probs = np.full(7, 1e-3 / 6)
    probs[expression] = 1 - 1e-3
    for _ in range(iterations):
        scores = taxonomy.au_log_likelihood((probs @ table)[None], model)[0]
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
    p = np.clip(probs @ table, 1e-7, 1 - 1e-7)
    return (np.log(probs)[None].astype(np.float32),
            np.log(p / (1 - p))[None].astype(np.float32), probs)


@pytest.mark.parametrize("stop_gradient", [False, True])
@pytest.mark.parametrize("expression", range(7), ids=taxonomy.EXPRESSIONS)
def test_distribution_matching_costs_nothing_where_the_heads_agree(expression, stop_gradient):
    """At agreement the term is ~0 and its gradient pulls toward no class (not Neutral)."""
    table = taxonomy.basic_relatedness()
    coupling = losses.Coupling(table, taxonomy.prototypical_mask(taxonomy.EXPRESSIONS),
                               stop_gradient=stop_gradient)
    z, s, probs = _agreeing_heads(expression, table)
    assert np.argmax(probs) == expression and probs[expression] > 0.99

    def dm(z, s):
        return losses.distribution_matching_loss({"expression_logits": z, "au_logits": s},
                                                 coupling)

    value, (dz, ds) = jax.value_and_grad(dm, argnums=(0, 1))(z, s)
    assert float(value) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(dz, 0.0, atol=1e-6)
    np.testing.assert_allclose(ds, 0.0, atol=1e-6)


def test_distribution_matching_prefers_agreement_on_any_expression_to_neutral_with_no_au():
    # The cross-entropy form paid the network for Neutral with every AU off (~0.015 there against
    # 3.4 for agreeing heads on Happiness); the divergence ranks every agreement first.
    table = taxonomy.basic_relatedness()
    coupling = losses.Coupling(table, taxonomy.prototypical_mask(taxonomy.EXPRESSIONS))
    neutral = {"expression_logits": np.array([[8.0, 0, 0, 0, 0, 0, 0]], np.float32),
               "au_logits": np.full((1, 17), -8.0, np.float32)}
    neutral_cost = float(losses.distribution_matching_loss(neutral, coupling))
    for expression in range(7):
        z, s, _ = _agreeing_heads(expression, table)
        agreement = float(losses.distribution_matching_loss(
            {"expression_logits": z, "au_logits": s}, coupling))
        assert agreement < neutral_cost, (taxonomy.EXPRESSIONS[expression], agreement)


def test_distribution_matching_stop_gradient_decides_which_head_learns_from_what():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(2, 7)).astype(np.float32)
    s = rng.normal(size=(2, 4)).astype(np.float32)

    def grads(stop):
        def f(z, s):
            return losses.distribution_matching_loss(
                {"expression_logits": z, "au_logits": s}, losses.Coupling(R4, P4, stop))
        return jax.grad(f, argnums=(0, 1))(z, s)

    dz_stop, ds_stop = grads(True)
    # With constant targets each head's gradient is its own divergence's: the AU side is a mean
    # over the 4 AUs and the images, (p - q) / (4 B); the expression side (softmax(z) - r) / B,
    # the target being the other head's prediction mapped through the table.
    pe = jax.nn.softmax(z)
    q = pe @ R4
    np.testing.assert_allclose(ds_stop, (jax.nn.sigmoid(s) - q) / 8, rtol=1e-5, atol=1e-7)
    model = np.clip(R4.astype(np.float64), 0.05, 0.95)
    p = _np_sigmoid(s)
    scores = p @ np.log(model).T + (1 - p) @ np.log(1 - model).T
    r = np.exp(scores - scores.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    np.testing.assert_allclose(dz_stop, (pe - r) / 2, rtol=1e-5, atol=1e-7)
    dz_free, ds_free = grads(False)
    assert not np.allclose(dz_free, dz_stop) and not np.allclose(ds_free, ds_stop)
    for g in (dz_stop, ds_stop, dz_free, ds_free):
        assert np.isfinite(np.asarray(g)).all()


def test_distribution_matching_is_finite_where_a_table_column_is_all_zero():
    # AU14 is in no row of Du et al.'s table: its target q is exactly 0 on every image.
    table = taxonomy.basic_relatedness()
    assert not table[:, taxonomy.AUS.index(14)].any()
    coupling = losses.Coupling(table, taxonomy.prototypical_mask(taxonomy.EXPRESSIONS))
    rng = np.random.default_rng(5)
    outputs = {"expression_logits": rng.normal(size=(4, 7)).astype(np.float32) * 30,
               "au_logits": rng.normal(size=(4, 17)).astype(np.float32) * 30}
    value, grads = jax.value_and_grad(
        lambda o: losses.distribution_matching_loss(o, coupling))(outputs)
    assert np.isfinite(float(value)) and float(value) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in grads.values())


def test_coupled_losses_are_finite_with_nothing_labelled():
    outputs, batch = _batch(11, num_aus=4)
    for field in ("expression_mask", "au_mask", "va_mask"):
        batch[field] = np.zeros_like(batch[field])
    weights = {**WEIGHTS, "co_annotation": 1.0, "distribution_matching": 1.0}
    for stop in (False, True):
        coupling = losses.Coupling(R4, P4, stop)
        value, grads = jax.value_and_grad(
            lambda o: losses.task_losses(o, batch, weights, coupling=coupling)[0])(outputs)
        assert np.isfinite(float(value))
        assert all(np.isfinite(np.asarray(g)).all() for g in grads.values())
        terms = losses.task_losses(outputs, batch, weights, coupling=coupling)[1]
        assert float(terms["co_annotation"]) == 0.0  # no label, nothing implied


def test_coupling_off_is_exactly_the_plain_loss():
    outputs, batch = _batch(12)
    plain_value, plain_grads = _loss_and_grad(outputs, batch)
    off = {**WEIGHTS, "co_annotation": 0.0, "distribution_matching": 0.0}
    value, grads = _loss_and_grad(outputs, batch, off)
    assert float(value) == float(plain_value)
    for name in grads:
        np.testing.assert_array_equal(grads[name], plain_grads[name])
    _, terms = losses.task_losses(outputs, batch, off)
    assert set(terms) == {"expression", "au", "va", "total"}  # off terms are not computed
    with pytest.raises(ValueError, match="no Coupling was given"):
        losses.task_losses(outputs, batch, {**WEIGHTS, "co_annotation": 1.0})
