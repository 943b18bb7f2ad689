"""FaceBehaviorNet outputs and backbones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import resnet50_shapes
from fbnet_jax.model import FaceBehaviorNet, backbones


def _init_apply(model, image, train=False, rng=0):
    variables = model.init(jax.random.PRNGKey(0), image, train=False)
    outputs = model.apply(variables, image, train=train, rngs={"dropout": jax.random.PRNGKey(rng)},
                          mutable=["batch_stats"] if train else False)
    return variables, outputs[0] if train else outputs


@pytest.mark.parametrize("backbone,kwargs,size", [
    ("small_cnn", dict(widths=(8, 16), features=32), 32),
    ("vgg_face", dict(fc=64), 32),
])
def test_output_contract(backbone, kwargs, size):
    model = FaceBehaviorNet(backbone=backbone, backbone_kwargs=kwargs, num_aus=17)
    image = jax.random.uniform(jax.random.PRNGKey(1), (3, size, size, 3), minval=-1, maxval=1)
    _, out = _init_apply(model, image)
    assert out["expression_logits"].shape == (3, 7)
    assert out["au_logits"].shape == (3, 17)
    assert out["va"].shape == (3, 2)
    assert out["features"].shape == (3, kwargs.get("features", kwargs.get("fc")))
    assert float(jnp.max(jnp.abs(out["va"]))) < 1.0  # tanh


def test_vgg_face_has_the_paper_layout():
    model = FaceBehaviorNet(backbone="vgg_face", backbone_kwargs=dict(fc=4096))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 96, 96, 3)), train=False))
    params = shapes["params"]["backbone"]
    convs = [name for name in params if name.startswith("conv")]
    assert len(convs) == 13 and "conv5_3" in convs
    assert params["conv1_1"]["kernel"].shape == (3, 3, 3, 64)
    # 96 / 2**5 = 3: fc6 sees a 3x3x512 map.
    assert params["fc6"]["kernel"].shape == (3 * 3 * 512, 4096)
    assert params["fc7"]["kernel"].shape == (4096, 4096)


def test_bfloat16_backbone_gives_float32_heads():
    model = FaceBehaviorNet(backbone_kwargs=dict(widths=(8,), features=16), dtype=jnp.bfloat16)
    _, out = _init_apply(model, jnp.zeros((2, 16, 16, 3)))
    assert all(out[k].dtype == jnp.float32 for k in ("expression_logits", "au_logits", "va"))


def test_dropout_only_in_training():
    model = FaceBehaviorNet(backbone_kwargs=dict(widths=(8,), features=64, dropout=0.5))
    image = jax.random.normal(jax.random.PRNGKey(2), (4, 16, 16, 3))
    variables, _ = _init_apply(model, image)
    a = model.apply(variables, image, train=False)["expression_logits"]
    b = model.apply(variables, image, train=False)["expression_logits"]
    np.testing.assert_array_equal(a, b)
    _, c = _init_apply(model, image, train=True, rng=1)
    _, d = _init_apply(model, image, train=True, rng=2)
    assert not np.allclose(c["expression_logits"], d["expression_logits"])


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backbone 'resnet7'"):
        FaceBehaviorNet(backbone="resnet7").init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))


def test_small_cnn_pools_once_per_stage():
    module = backbones.SmallCNN(widths=(4, 4, 4), features=8)
    variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    # 32 / 2**3 = 4: the dense layer sees a 4x4x4 map.
    assert variables["params"]["Dense_0"]["kernel"].shape == (4 * 4 * 4, 8)


def _resnet50_shapes(size, **kwargs):
    return jax.eval_shape(lambda: backbones.ResNet50().init(
        jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False, **kwargs))


def test_resnet50_has_torchvision_parameter_count():
    params = _resnet50_shapes(64)["params"]
    # torchvision's ResNet-50 has 25,557,032 parameters; its fc layer 2048 * 1000 + 1000 of them.
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == 25_557_032 - 2048 * 1000 - 1000


def test_resnet50_variables_map_one_to_one_onto_torchvision_keys():
    variables = _resnet50_shapes(64)
    # torchvision's state_dict without its classifier and BatchNorm step counters.
    expected = {key: shape for key, shape in resnet50_shapes().items()
                if not key.startswith("fc.") and not key.endswith("num_batches_tracked")}
    assert len(expected) == 53 * 5  # 53 convs (one weight each), 53 BatchNorms (four each)
    mapped = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
            key = backbones.torchvision_key(tuple(entry.key for entry in path))
            assert key not in mapped, key
            mapped[key] = leaf.shape
    assert set(mapped) == set(expected)
    for key, torch_shape in expected.items():
        if len(torch_shape) == 4:  # conv weights: torch OIHW [O, I, kh, kw] -> flax HWIO
            out_channels, in_channels, kh, kw = torch_shape
            torch_shape = (kh, kw, in_channels, out_channels)
        assert mapped[key] == torch_shape, key


def test_torchvision_key_examples():
    assert backbones.torchvision_key(("layer1_0", "bn1", "scale")) == "layer1.0.bn1.weight"
    assert backbones.torchvision_key(("layer3_5", "bn2", "var")) == "layer3.5.bn2.running_var"
    assert (backbones.torchvision_key(("layer2_0", "downsample_0", "kernel"))
            == "layer2.0.downsample.0.weight")
    with pytest.raises(ValueError, match="not a ResNet50 variable"):
        backbones.torchvision_key(("conv1", "weight"))


@pytest.mark.parametrize("size,stages", [(224, (56, 28, 14, 7)), (112, (28, 14, 7, 4))])
def test_resnet50_feature_maps_have_torchvision_sizes(size, stages):
    captured = _resnet50_shapes(size, capture_intermediates=True)["intermediates"]
    # conv1 on its own: a wrong padding there can be hidden by the max-pool's rounding.
    assert captured["conv1"]["__call__"][0].shape == (1, size // 2, size // 2, 64)
    for layer, (blocks, side) in enumerate(zip((3, 4, 6, 3), stages), start=1):
        width = 4 * 64 * 2 ** (layer - 1)
        shape = captured[f"layer{layer}_{blocks - 1}"]["__call__"][0].shape
        assert shape == (1, side, side, width), (layer, shape)
    # v1.5: a stage's first block strides on its 3x3 conv (conv2), not on the 1x1 conv1.
    block = captured["layer2_0"]
    assert block["conv1"]["__call__"][0].shape[1] == stages[0]
    assert block["conv2"]["__call__"][0].shape[1] == stages[1]


def test_resnet50_output_contract():
    model = FaceBehaviorNet(backbone="resnet50")
    image = jnp.zeros((2, 64, 64, 3))
    out = jax.eval_shape(lambda: model.apply(model.init(jax.random.PRNGKey(0), image), image))
    assert {k: v.shape for k, v in out.items()} == {
        "expression_logits": (2, 7), "au_logits": (2, 17), "va": (2, 2), "features": (2, 2048)}


def test_resnet50_computes_in_dtype():
    module = backbones.ResNet50(dtype=jnp.bfloat16)
    image = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), image, train=False))
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    features = jax.eval_shape(lambda v: module.apply(v, image, train=False), variables)
    assert features.dtype == jnp.bfloat16


def _filled(shapes, seed=0):
    """Values for the leaves of `shapes` (an eval_shape of init) without running the
    initializers, whose compilation for ResNet-50 costs a CPU test more than the step itself:
    kernels N(0, 1/fan_in), BatchNorm scale and variance 1, biases and means 0."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = path[-1].key
        if name == "kernel":
            fan_in = np.prod(shape.shape[:-1])
            return jnp.asarray(rng.standard_normal(shape.shape, np.float32) / np.sqrt(fan_in))
        return jnp.ones(shape.shape) if name in ("scale", "var") else jnp.zeros(shape.shape)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def test_resnet50_trains():
    model = FaceBehaviorNet(backbone="resnet50")
    image = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3), minval=-1, maxval=1)
    variables = _filled(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image)))

    def loss(params):
        out, updates = model.apply({**variables, "params": params}, image, train=True,
                                   rngs={"dropout": jax.random.PRNGKey(2)},
                                   mutable=["batch_stats"])
        return jnp.sum(out["expression_logits"] ** 2) + jnp.sum(out["va"]), updates

    # One step: LLVM optimisation would cost more compile time than it saves.
    step = jax.jit(jax.grad(loss, has_aux=True),
                   compiler_options={"xla_backend_optimization_level": 0})
    grads, updates = step(variables["params"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.max(jnp.abs(grads["backbone"]["conv1"]["kernel"]))) > 0
    old, new = variables["batch_stats"]["backbone"], updates["batch_stats"]["backbone"]
    assert not np.allclose(old["bn1"]["mean"], new["bn1"]["mean"])
    assert not np.allclose(old["layer4_2"]["bn3"]["var"], new["layer4_2"]["bn3"]["var"])


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 7, 9, 5)])
def test_the_2x2_pool_is_max_pool_with_its_gradient(shape):
    import flax.linen as nn
    # Small integers: many exact ties, positive and (after the ReLU) at 0.
    x = jnp.asarray(np.random.default_rng(0).integers(-3, 4, shape), jnp.float32)

    def reference(v):
        return nn.max_pool(v, window_shape=(2, 2), strides=(2, 2))

    assert backbones._pool(x).shape == reference(x).shape   # an odd row or column is dropped
    np.testing.assert_array_equal(backbones._pool(x), reference(x))
    # The gradient is max_pool's exactly, ties included (it goes to the first maximum of a
    # window), on the raw input and behind a ReLU as the backbones use it.
    weights = jnp.arange(1.0, 1.0 + np.prod(reference(x).shape)).reshape(reference(x).shape)
    windows = np.asarray(x)[:, :shape[1] // 2 * 2, :shape[2] // 2 * 2].reshape(
        shape[0], shape[1] // 2, 2, shape[2] // 2, 2, shape[3])
    ties = (windows == windows.max(axis=(2, 4), keepdims=True)).sum(axis=(2, 4)) > 1
    assert ties.any() and (windows.max(axis=(2, 4))[ties] > 0).any()   # positive ties happen
    for before in (lambda v: v, jax.nn.relu):
        ours = jax.grad(lambda v: (backbones._pool(before(v)) * weights).sum())(x)
        theirs = jax.grad(lambda v: (reference(before(v)) * weights).sum())(x)
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batchnorm_is_flax_batchnorm(train, dtype):
    import flax.linen as nn
    rng = np.random.default_rng(0)
    # Far from zero mean: y = x * a + (bias - mean * a) must not lose what (x - mean) keeps.
    x = jnp.asarray(rng.normal(4.0, 3.0, (6, 5, 4, 7)), jnp.float32)
    ours = backbones.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype)
    theirs = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype)
    init_ours, init_theirs = ours.init(jax.random.key(0), x), theirs.init(jax.random.key(0), x)
    assert jax.tree.structure(init_ours) == jax.tree.structure(init_theirs)
    for a, b in zip(jax.tree.leaves(init_ours), jax.tree.leaves(init_theirs)):
        np.testing.assert_array_equal(a, b)
    params = {"scale": jnp.asarray(rng.normal(1.0, 0.5, 7), jnp.float32),
              "bias": jnp.asarray(rng.normal(0.0, 0.5, 7), jnp.float32)}
    stats = {"mean": jnp.asarray(rng.normal(4.0, 1.0, 7), jnp.float32),
             "var": jnp.asarray(rng.uniform(5.0, 12.0, 7), jnp.float32)}
    weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def run(module):
        def loss(p, v):
            y, updates = module.apply({"params": p, "batch_stats": stats}, v,
                                      mutable=["batch_stats"])
            return (y.astype(jnp.float32) * weights).sum(), (y, updates)
        (_, (y, updates)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            params, x)
        return y, updates, grads

    (y1, u1, g1), (y2, u2, g2) = run(ours), run(theirs)
    assert y1.dtype == y2.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y2, np.float32),
                               rtol=tol, atol=tol)
    for a, b in zip(jax.tree.leaves((u1, g1)), jax.tree.leaves((u2, g2))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
    if train:   # the running averages moved, by the batch's statistics
        np.testing.assert_allclose(u1["batch_stats"]["mean"],
                                   0.9 * stats["mean"] + 0.1 * x.mean((0, 1, 2)), rtol=1e-6)


def test_batchnorm_averages_statistics_over_its_axis():
    import flax.linen as nn
    x = jnp.asarray(np.random.default_rng(1).normal(2.0, 1.0, (8, 3, 3, 4)), jnp.float32)
    whole = nn.BatchNorm(use_running_average=False, momentum=0.9)
    variables = whole.init(jax.random.key(0), x)
    y, updates = whole.apply(variables, x, mutable=["batch_stats"])
    # The batch in two halves, one per (vmapped) device, statistics averaged over both.
    ours = backbones.BatchNorm(use_running_average=False, momentum=0.9, axis_name="devices")
    halves, halves_updates = jax.vmap(
        lambda v: ours.apply(variables, v, mutable=["batch_stats"]), axis_name="devices")(
        x.reshape(2, 4, 3, 3, 4))
    np.testing.assert_allclose(halves.reshape(x.shape), y, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(halves_updates), jax.tree.leaves(updates)):
        np.testing.assert_allclose(a[0], b, rtol=1e-6)
        np.testing.assert_allclose(a[1], b, rtol=1e-6)
