"""The scale-out runtime: pmap == jit == one device, gradient accumulation, bf16, non-finite
steps, and checkpoints that cross modes. Multi-device cases run on fake CPU devices in a fresh
interpreter (`run_isolated`)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import first_batch, run_isolated
from fbnet_jax.runtime import checkpointing, parallel
from fbnet_jax.train import loop as train
from fbnet_jax.runtime import state as state_lib

# One step of every mode on the same global batch of 16 rows whose labels fall unevenly over 8
# devices (2 rows each): expressions on rows 0-5 (devices 0-2), VA on rows 0-2 (devices 0-1;
# none at all with the coupling losses on), AUs on rows 7-15 only (device 3 half, devices 4-7).
# SGD without momentum, so the parameters after the step are the gradient, scaled.
_MODES_CODE = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from conftest import load_config
from data_pipelines import pipeline
from fbnet_jax.runtime import parallel, state as state_lib
from fbnet_jax.train import loop as train

import flax.linen as nn
import jax.numpy as jnp


class NoBatchNorm(nn.Module):
    # FaceBehaviorNet's outputs from a conv and a dense layer: no BatchNorm, no dropout.
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.max_pool(nn.relu(nn.Conv(8, (3, 3))(x)), window_shape=(4, 4), strides=(4, 4))
        f = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
        return {"expression_logits": nn.Dense(7)(f), "au_logits": nn.Dense(17)(f),
                "va": jnp.tanh(nn.Dense(2)(f)), "features": f}


backbone, coupling = sys.argv[1], float(sys.argv[2])
runs = [(mode, int(n), int(k)) for mode, n, k in (spec.split(":") for spec in sys.argv[3:])]
config = load_config("synthetic.py", "tiny")
config.optimizer.name, config.optimizer.momentum = "sgd", 0.0
config.optimizer.warmup_steps, config.optimizer.learning_rate = 0, 0.1
config.optimizer.weight_decay = 0.0
config.loss.weights.co_annotation = config.loss.weights.distribution_matching = coupling
iterator = pipeline.build_train_iterator(config, process_index=0, process_count=1)
local = next(iterator)
pipeline.close_iterator(iterator)
local["expression_mask"][6:] = 0
local["va_mask"][3:] = 0
local["au_mask"][:7] = 0
if coupling:  # and a task without any label in the batch
    local["va_mask"][:] = 0
out = {}
for mode, n, k in runs:
    mesh = parallel.create_mesh(jax.devices()[:n])
    model, tx, _, state = state_lib.create_state(config, mesh)
    if backbone == "no_batch_norm":
        model = NoBatchNorm()
        state = jax.device_put(state_lib.init_state(model, tx, jax.random.PRNGKey(0), 32),
                               parallel.replicated(mesh))
    axis = parallel.DATA_AXIS if mode == "pmap" else None
    runner = parallel.StepRunner(train.make_train_step(
        model.clone(bn_axis_name=axis), tx, config.loss.weights, train.coupling_for(config),
        axis_name=axis, grad_accum_steps=k), mode, mesh)
    new_state, means = runner(runner.layout(state), runner.batch(local))
    new_state = runner.global_state(new_state)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(new_state.params))
    out[f"{mode}{n}/k{k}"] = {
        "metrics": means.compute(),
        "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(new_state.params)],
        "stats": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(new_state.batch_stats)]}
print(json.dumps(out))
"""


def _modes(backbone, coupling, *runs):
    """Runs `mode:devices:microbatches` specs; returns their results keyed `<mode><n>/k<k>`."""
    out = run_isolated(_MODES_CODE, devices=8, args=[backbone, str(coupling), *runs])
    return json.loads(out.strip().splitlines()[-1])


def _assert_same_step(a, b, what):
    assert set(a["metrics"]) == set(b["metrics"]), what
    for key, value in a["metrics"].items():
        assert b["metrics"][key] == pytest.approx(value, rel=2e-5, abs=1e-6), (what, key)
    for group in ("params", "stats"):
        assert len(a[group]) == len(b[group])
        for x, y in zip(a[group], b[group]):
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=2e-6, err_msg=f"{what} {group}")


@pytest.mark.parametrize("coupling", [0.0, 1.0])
def test_pmap_jit_and_one_device_make_the_same_step_with_uneven_labels(coupling):
    out = _modes("small_cnn", coupling, "jit:1:1", "jit:8:1", "pmap:8:1")
    one = out["jit1/k1"]
    assert one["stats"], "small_cnn has BatchNorm statistics to compare"
    assert ("loss/co_annotation" in one["metrics"]) == bool(coupling)
    assert (one["metrics"]["loss/va"] == 0.0) == bool(coupling)  # no VA label: the term is 0
    _assert_same_step(one, out["jit8/k1"], "jit on 8 devices")
    _assert_same_step(one, out["pmap8/k1"], "pmap on 8 devices")


def test_gradient_accumulation_equals_the_whole_batch_without_batch_norm():
    # Without BatchNorm (and dropout), K microbatches must give exactly the loss and gradient of
    # the whole batch, although VA's CCC and the masked means are not means over microbatches.
    # K=8 on one device is one row per microbatch.
    out = _modes("no_batch_norm", 1.0, "jit:1:1", "jit:1:2", "jit:1:8", "jit:8:2", "pmap:8:2")
    one = out["jit1/k1"]
    assert not one["stats"]
    _assert_same_step(one, out["jit1/k2"], "jit K=2 on 1 device")
    _assert_same_step(one, out["jit1/k8"], "jit K=8 on 1 device")
    _assert_same_step(one, out["jit8/k2"], "jit K=2 on 8 devices")
    _assert_same_step(one, out["pmap8/k2"], "pmap K=2 on 8 devices")




def test_gradient_accumulation_with_batch_norm_normalises_each_microbatch(tiny_config):
    # With BatchNorm, K=2 is a different computation (statistics of 8 rows instead of 16), and
    # the running statistics move twice per step: documented, and checked here so that a change
    # of that behaviour is noticed.
    mesh = parallel.create_mesh(jax.devices()[:1])
    model, tx, _, state = state_lib.create_state(tiny_config, mesh)
    batch = parallel.global_batch(first_batch(tiny_config), mesh)
    results = {}
    for k in (1, 2):
        step = jax.jit(train.make_train_step(model, tx, tiny_config.loss.weights,
                                             grad_accum_steps=k))
        results[k] = step(state, batch)
    loss = {k: results[k][1].compute()["loss/total"] for k in (1, 2)}
    assert loss[1] != loss[2] and loss[2] == pytest.approx(loss[1], rel=0.05)
    mean = lambda s: np.asarray(jax.tree.leaves(s.batch_stats)[0])  # noqa: E731
    # momentum 0.9 applied twice from 0 moves the mean by 1 - 0.81 of the batch means, not 0.1.
    assert np.abs(mean(results[2][0])).sum() > 1.5 * np.abs(mean(results[1][0])).sum()


def test_bfloat16_trains_close_to_float32_with_float32_state(tiny_config):
    tiny_config.optimizer.warmup_steps = 0
    mesh = parallel.create_mesh(jax.devices()[:1])
    batch = parallel.global_batch(first_batch(tiny_config), mesh)
    losses, states = {}, {}
    for dtype in ("float32", "bfloat16"):
        tiny_config.model.dtype = dtype
        model, tx, _, state = state_lib.create_state(tiny_config, mesh)
        step = jax.jit(train.make_train_step(model, tx, tiny_config.loss.weights))
        losses[dtype] = []
        for _ in range(5):
            state, means = step(state, batch)
            losses[dtype].append(means.compute()["loss/total"])
        states[dtype] = state
    # Parameters, optimizer state and losses stay float32; the backbone computes in bfloat16.
    assert {x.dtype for x in jax.tree.leaves((states["bfloat16"].params,
                                              states["bfloat16"].opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype("float32")}
    assert losses["bfloat16"] != losses["float32"]
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.02)
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]


def test_skip_keeps_the_state_of_a_non_finite_step_and_counts_it(tiny_config):
    mesh = parallel.create_mesh(jax.devices()[:1])
    model, tx, _, state = state_lib.create_state(tiny_config, mesh)
    local = first_batch(tiny_config)
    bad = dict(local, va=np.full_like(local["va"], np.nan), va_mask=np.ones_like(local["va_mask"]))
    for policy in ("stop", "skip"):
        step = jax.jit(train.make_train_step(model, tx, tiny_config.loss.weights,
                                             nonfinite=policy))
        new_state, means = step(state, parallel.global_batch(bad, mesh))
        assert int(new_state.step) == 1 and int(means.skipped) == 1
        params_finite = all(np.isfinite(np.asarray(x)).all()
                            for x in jax.tree.leaves(new_state.params))
        if policy == "stop":  # the update is applied: the loop stops the run at its next check
            assert not params_finite
        else:
            assert params_finite
            for a, b in zip(jax.tree.leaves((state.params, state.batch_stats, state.opt_state)),
                            jax.tree.leaves((new_state.params, new_state.batch_stats,
                                             new_state.opt_state))):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        good_state, good = step(new_state if policy == "skip" else state,
                                parallel.global_batch(local, mesh))
        assert int(good.skipped) == 0 and np.isfinite(good.compute()["loss/total"])


def _inject_nan_at(monkeypatch, steps):
    """Makes the batches of the given (1-based) steps of a run carry NaN VA labels."""
    calls = {"n": 0}
    original = parallel.StepRunner.batch

    def batch(self, local_batch):
        calls["n"] += 1
        if calls["n"] in steps:
            local_batch = dict(local_batch, va=np.full_like(local_batch["va"], np.nan),
                               va_mask=np.ones_like(local_batch["va_mask"]))
        return original(self, local_batch)
    monkeypatch.setattr(parallel.StepRunner, "batch", batch)


def _nan_run_config(config, policy, limit=10):
    config.train.num_steps = 8
    config.evals.validation.every = 0
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.train.best_metric = ""
    config.train.nonfinite = policy
    config.train.nonfinite_max_in_a_row = limit
    return config


def test_nonfinite_skip_finishes_the_run_and_logs_the_skipped_steps(tiny_config, tmp_path,
                                                                     monkeypatch):
    _inject_nan_at(monkeypatch, {3, 6})
    metrics = train.train_and_evaluate(_nan_run_config(tiny_config, "skip", limit=2), tmp_path)
    assert np.isfinite(metrics["test/expression_accuracy"])
    log_text = (tmp_path / "train.log").read_text()
    assert "WARNING: skipped 1 of the steps 3-4: non-finite loss or gradient" in log_text
    assert "WARNING: skipped 1 of the steps 5-6: non-finite loss or gradient" in log_text
    assert checkpointing.saved_steps(tmp_path)[-1] == 8


@pytest.mark.parametrize("policy,nan_steps,message", [
    # Under "stop" the NaN update of step 3 is applied, so step 4 is non-finite as well.
    ("stop", {3}, r"non-finite loss or gradient in 2 of the steps 3-4; the last good checkpoint "
                  r"\(step 2\) is kept"),
    # A run of 3 that spans two log intervals (steps 4 | 5, 6) is counted whole.
    ("skip", {4, 5, 6}, r"3 steps in a row had a non-finite loss or gradient and were skipped "
                        r"\(up to step 6; train.nonfinite_max_in_a_row is 3\); the last good "
                        r"checkpoint \(step 4\) is kept"),
])
def test_nonfinite_steps_stop_the_run_without_checkpointing_them(tiny_config, tmp_path,
                                                                  monkeypatch, policy, nan_steps,
                                                                  message):
    _inject_nan_at(monkeypatch, nan_steps)
    with pytest.raises(FloatingPointError, match=message):
        train.train_and_evaluate(_nan_run_config(tiny_config, policy, limit=3), tmp_path)
    steps = checkpointing.saved_steps(tmp_path)
    assert steps == ([2] if policy == "stop" else [2, 4])


# A run in one mode stopped at step 2 and continued in the other mode ends where a run in the
# jit mode alone ends: checkpoints are saved in one layout whatever the mode.
_CROSS_CODE = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from conftest import load_config
from fbnet_jax.runtime import checkpointing, state as state_lib
from fbnet_jax.train import loop as train

def config(mode, stop_after):
    c = load_config("synthetic.py", "tiny")
    c.train.num_steps, c.evals.validation.every, c.train.checkpoint_every = 4, 0, 2
    c.train.best_metric, c.train.stop_after_steps = "", stop_after
    c.parallel.mode = mode
    return c

root = sys.argv[1]
finals = {}
for name, modes in (("jit", ["jit"]), ("pmap_then_jit", ["pmap", "jit"]),
                    ("jit_then_pmap", ["jit", "pmap"]), ("pmap", ["pmap"])):
    workdir = f"{root}/{name}"
    for i, mode in enumerate(modes):
        try:
            train.train_and_evaluate(config(mode, 2 if len(modes) > 1 and i == 0 else 0), workdir)
        except train.TrainingStopped:
            pass
    c = config("jit", 0)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    _, _, _, abstract = state_lib.create_state(c, mesh, abstract=True)
    manager = checkpointing.create_manager(workdir, read_only=True)
    state, step = checkpointing.restore(manager, abstract)
    manager.close()
    finals[name] = {"step": step, "params": [np.asarray(x).ravel().tolist()
                                             for x in jax.tree.leaves(state.params)]}
print(json.dumps(finals))
"""


def test_a_checkpoint_written_in_one_mode_continues_in_the_other(tmp_path):
    out = json.loads(run_isolated(_CROSS_CODE, devices=4, args=[str(tmp_path)]
                                  ).strip().splitlines()[-1])
    reference = out["jit"]
    assert reference["step"] == 4
    for name in ("pmap_then_jit", "jit_then_pmap", "pmap"):
        assert out[name]["step"] == 4
        for a, b in zip(reference["params"], out[name]["params"]):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=name)
    log_text = (tmp_path / "pmap_then_jit" / "train.log").read_text()
    assert "step: jax.pmap over 4 device(s)" in log_text
    assert "parallel.mode: 'pmap' -> 'jit'" in log_text
