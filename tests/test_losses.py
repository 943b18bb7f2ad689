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

from fbnet_jax import losses

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
    from fbnet_jax import losses
    from test_losses import WEIGHTS, _batch

    devices = jax.devices()
    assert len(devices) == 8, devices
    outputs, batch = _batch(7, batch_size=16)
    batch["expression_mask"][:6] = 0.0   # shards 0-2: no expression label
    batch["va_mask"][8:] = 0.0           # shards 4-7: no VA label
    batch["au_mask"][2:4] = 0.0          # shard 1: no AU label

    def loss_and_grad(outputs, batch, axis_name=None):
        def total(o):
            return losses.task_losses(o, batch, WEIGHTS, axis_name)
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
        np.testing.assert_allclose(pmap_terms[name], np.full(8, value), rtol=1e-5, err_msg=name)
    for name, grad in single_grads.items():
        np.testing.assert_allclose(jit_grads[name], grad, rtol=1e-4, atol=1e-7, err_msg=name)
        # grad transposes psum into psum: each device holds 8x its slice of the global gradient.
        np.testing.assert_allclose(np.asarray(pmap_grads[name]).reshape(grad.shape) / 8, grad,
                                   rtol=1e-4, atol=1e-7, err_msg=name)
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
    assert result.stdout.startswith("ok"), result.stdout
