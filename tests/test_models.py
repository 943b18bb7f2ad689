"""FaceBehaviorNet outputs and backbones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbnet_jax.models import FaceBehaviorNet, backbones


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
