"""The parity check that ends every export: the artefact must reproduce the JAX model.

The artefact is loaded back from disk and run (ONNX Runtime, `jax.export.deserialize`,
`tf.saved_model.load`, `load_safetensors`: see `export_formats`) on synthetic faces
(`data_pipelines/synthetic.py`) in batches of 1 and 5, and compared with `InferenceModel.apply`.

Tolerance: an output may differ by at most tol · (1 + |JAX value|), tol by the graph's dtype
(`TOLERANCE`). In float32, runtimes sum convolutions and matrix products in other orders (ONNX
Runtime's kernels, fused BatchNorm, XLA's own fusions), which moves each layer's result by a few
units in the last place: differences of about 1e-6 on these networks (at most 7e-7 measured on
the tiny small_cnn, ONNX and SavedModel). 1e-4 leaves two orders of magnitude for deeper networks
and larger logits, while the mistakes the check is there for move outputs by far more: on the
tiny model after 2 steps, BatchNorm on batch statistics by up to 1.7, pixels scaled by 1/255
instead of the model's scaling by 0.78, BGR instead of RGB by 0.47. bfloat16 keeps 8 significant
bits (steps of 2^-8 ≈ 4e-3 relative) and float16 11 (≈ 5e-4), so a few roundings taken in
another order allow 3e-2 and 5e-3. safetensors runs the same JAX function on the same weights
read back bit for bit, so it must agree exactly (tolerance 0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from data_pipelines import schema, synthetic
from fbnet_jax.core.errors import EXIT_FAILED, UserError
from fbnet_jax.serve.inference import OUTPUTS, InferenceModel

# Parity check: batch sizes (1 and another, so the batch dimension is shown to be dynamic),
# the synthetic faces' seed, and the tolerance per graph dtype (module docstring).
PARITY_BATCH_SIZES = (1, 5)
PARITY_SEED = 2019
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}

# An artefact loaded back: the float32 model input -> its outputs by name.
Runner = Callable[[np.ndarray], Mapping[str, Any]]


class ParityError(UserError, RuntimeError):
    """An exported artefact does not reproduce the JAX model; nothing is left at the output path.

    A bug (of a converter or of this project), not a user mistake; the message names the output
    and the difference, all the user can act on (another format or dtype, a report): `fbnet`
    prints it as one line and exits with status 1.
    """

    exit_code = EXIT_FAILED


def parity_faces(image_size: int, count: int = max(PARITY_BATCH_SIZES)) -> np.ndarray:
    """`count` synthetic faces rendered at the model's size: uint8 [count, S, S, 3]."""
    source = synthetic.SyntheticFaces(
        synthetic.SyntheticSpec(num_records=count, seed=PARITY_SEED, image_size=image_size),
        split="test")
    return np.stack([source[i][schema.IMAGE] for i in range(count)])


def check_parity(model: InferenceModel, run: Runner, tolerance: float,
                 what: str) -> dict[str, float]:
    """Compares `run` (an exported artefact) with `model.apply` on synthetic faces.

    Returns:
      Per output (OUTPUTS order), the largest absolute difference over every batch size.

    Raises:
      ParityError: an output is missing, has another shape, or differs by more than
        tolerance · (1 + |JAX value|) anywhere (NaN included).
    """
    images = model.preprocess(parity_faces(model.image_size))
    reference = jax.jit(model.apply)
    worst = dict.fromkeys(OUTPUTS, 0.0)
    for size in PARITY_BATCH_SIZES:
        want = {name: np.asarray(value) for name, value in reference(images[:size]).items()}
        got = run(images[:size])
        for name in OUTPUTS:
            value = np.asarray(got[name]) if name in got else None
            if value is None or value.shape != want[name].shape:
                shape = "missing" if value is None else f"shape {list(value.shape)}"
                raise ParityError(f"{what}: output {name} is {shape} for a batch of {size}, "
                                  f"expected {list(want[name].shape)}")
            # NaN compares false, so a NaN output fails too (and is reported as inf).
            diff = np.nan_to_num(np.abs(value.astype(np.float64) - want[name]), nan=np.inf,
                                 posinf=np.inf)
            if not np.all(diff <= tolerance * (1.0 + np.abs(want[name]))):
                raise ParityError(
                    f"{what}: output {name} differs from the JAX model by up to "
                    f"{diff.max():.3g} on a batch of {size}; tolerance "
                    f"{tolerance:g}·(1 + |value|)")
            worst[name] = max(worst[name], float(diff.max()))
    return worst
