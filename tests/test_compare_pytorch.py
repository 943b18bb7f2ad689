"""benchmarks/compare_pytorch.py times the JAX model against a PyTorch twin; the twin must be it.

Same trainable parameters for every backbone, same losses on the same outputs, and, for small_cnn
with the JAX weights copied over, the same loss at every step of a few training steps (which
also checks the learning-rate schedule, AdamW and clipping).
"""

import jax
import numpy as np
import pytest

from conftest import load_benchmark, load_config
from fbnet_jax.model import losses
from fbnet_jax.runtime import parallel
from fbnet_jax.train import loop as train
from fbnet_jax.runtime import state as state_lib

torch = pytest.importorskip("torch")


compare = load_benchmark("compare_pytorch")


def _partially_labelled_batch(batch_size: int, image_size: int, num_aus: int, seed: int = 0):
    """Random labels with every kind of mask: missing tasks, missing AUs, junk under masks."""
    rng = np.random.default_rng(seed)
    batch = {
        "image": rng.uniform(-1, 1, (batch_size, image_size, image_size, 3)).astype(np.float32),
        "expression": rng.integers(0, 7, batch_size).astype(np.int32),
        "expression_mask": (rng.uniform(size=batch_size) < 0.6).astype(np.float32),
        "au": rng.integers(0, 2, (batch_size, num_aus)).astype(np.float32),
        "au_mask": (rng.uniform(size=(batch_size, num_aus)) < 0.5).astype(np.float32),
        "va": rng.uniform(-1, 1, (batch_size, 2)).astype(np.float32),
        "va_mask": (rng.uniform(size=batch_size) < 0.7).astype(np.float32),
    }
    batch["au_mask"][0] = 0.0  # an image without AU labels
    # Masked-out labels hold values that would break the losses if they were read.
    batch["expression"][batch["expression_mask"] == 0] = 99
    batch["au"][batch["au_mask"] == 0] = np.nan
    batch["va"][batch["va_mask"] == 0] = np.nan
    return batch


@pytest.mark.parametrize("backbone,image_size", [
    ("small_cnn", 32), ("small_cnn", 64), ("vgg_face", 96), ("vgg_face", 112),
    ("resnet50", 112)])
def test_same_trainable_parameters(backbone, image_size):
    config = compare.config_for(backbone, image_size, 2, "float32")
    model = state_lib.model_for(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               np.zeros((1, image_size, image_size, 3)),
                                               train=False))
    jax_count = sum(x.size for x in jax.tree.leaves(shapes["params"]))
    with torch.device("meta"):  # shapes only: VGG-FACE's 4096-wide layers are never allocated
        torch_count = compare.trainable_parameters(compare.torch_model(config))
    assert torch_count == jax_count


@pytest.mark.parametrize("seed", [0, 1])
def test_losses_equal_jax_losses(seed):
    batch = _partially_labelled_batch(12, 4, 17, seed)
    rng = np.random.default_rng(seed + 10)
    outputs = {"expression_logits": rng.normal(size=(12, 7)).astype(np.float32) * 3,
               "au_logits": rng.normal(size=(12, 17)).astype(np.float32) * 3,
               "va": np.tanh(rng.normal(size=(12, 2))).astype(np.float32)}
    weights = {"expression": 1.0, "au": 0.5, "va": 2.0}
    _, want = losses.task_losses(outputs, batch, weights)
    _, got = compare.task_losses(
        {k: torch.from_numpy(v) for k, v in outputs.items()}, compare.torch_batch(batch), weights)
    assert set(got) == set(want)
    for name, value in want.items():
        assert float(got[name]) == pytest.approx(float(value), abs=1e-5), name


def test_losses_of_an_unlabelled_batch_are_zero():
    batch = _partially_labelled_batch(4, 4, 17)
    for mask in ("expression_mask", "au_mask", "va_mask"):
        batch[mask][:] = 0.0
    outputs = {"expression_logits": torch.ones(4, 7), "au_logits": torch.ones(4, 17),
               "va": torch.zeros(4, 2)}
    _, terms = compare.task_losses(outputs, compare.torch_batch(batch),
                                   {"expression": 1.0, "au": 1.0, "va": 1.0})
    assert all(float(value) == 0.0 for value in terms.values())


def _copy_small_cnn(params, model):
    """Loads flax SmallCNN + heads parameters into the PyTorch twin."""
    tensors = {}
    convs = [m for m in model.backbone.trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.backbone.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for i, (conv, norm) in enumerate(zip(convs, norms)):
        tensors[conv.weight] = params["backbone"][f"Conv_{i}"]["kernel"].transpose(3, 2, 0, 1)
        tensors[norm.weight] = params["backbone"][f"BatchNorm_{i}"]["scale"]
        tensors[norm.bias] = params["backbone"][f"BatchNorm_{i}"]["bias"]
    dense = {("backbone", "Dense_0"): model.backbone.fc,
             ("expression_head",): model.expression_head, ("au_head",): model.au_head,
             ("va_head",): model.va_head}
    for path, linear in dense.items():
        leaf = params
        for key in path:
            leaf = leaf[key]
        tensors[linear.weight] = leaf["kernel"].T
        tensors[linear.bias] = leaf["bias"]
    assert len(tensors) == len(list(model.parameters()))
    with torch.no_grad():
        for tensor, value in tensors.items():
            tensor.copy_(torch.from_numpy(np.array(value)))


def test_small_cnn_train_steps_match_jax():
    """Same weights, same batch: the same loss at each of 4 steps (the first with lr 0)."""
    config = load_config("synthetic.py", "tiny")  # widths (8, 16), 32 px, dropout 0
    batch = _partially_labelled_batch(16, 32, len(config.data.aus))
    mesh = parallel.create_mesh()
    model, tx, _, state = state_lib.create_state(config, mesh)
    step_fn = jax.jit(train.make_train_step(model, tx, config.loss.weights))
    torch_model, torch_step = compare.torch_trainer(config, "float32")
    _copy_small_cnn(jax.device_get(state.params), torch_model)
    device_batch, host_batch = parallel.global_batch(batch, mesh), compare.torch_batch(batch)
    for step in range(4):
        state, metrics = step_fn(state, device_batch)
        want = float(metrics.compute()["loss/total"])
        got = float(torch_step(host_batch)["total"])
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5), f"step {step}"
