"""A trained network for inference: the checkpoint's weights, its config, and what its input is.

`InferenceModel.from_workdir(DIR)` (or `from_checkpoint(DIR/checkpoints/N)`) restores the
parameters and BatchNorm statistics of a checkpoint with the config stored in it, and gives the
network as a pure function of a float image batch: no dropout, BatchNorm with its running
statistics. Export (every format) and prediction start from here, so they agree on one
definition of the model and of its input:

  model input = uint8 RGB pixel · SCALE + OFFSET   (NHWC, image_size x image_size)

which is exactly what training fed it (both scale pixels by `fbnet_jax.core.images`, and run
the network in inference mode by `fbnet_jax.model.facebehaviornet.infer`, as evaluation does).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fbnet_jax.core import taxonomy
from fbnet_jax.core.images import OFFSET, SCALE, to_model_input
from fbnet_jax.model import facebehaviornet
from fbnet_jax.runtime import checkpointing
from fbnet_jax.runtime import state as state_lib

# The outputs an inference model returns, in order, with what they mean.
OUTPUTS = {
    "expression_logits": "[B, 7] logits of the basic expressions (softmax for probabilities), "
                         "classes in fbnet.expressions order",
    "au_logits": "[B, A] logits of the action units (sigmoid for probabilities), AUs in "
                 "fbnet.aus order",
    "va": "[B, 2] valence and arousal in (-1, 1)",
}


@dataclasses.dataclass(frozen=True)
class InferenceModel:
    """A checkpoint's network, ready to run.

    Attributes:
      config: the config stored with the checkpoint (locked).
      step: the checkpoint's step.
      model: the FaceBehaviorNet module.
      variables: {"params": ..., "batch_stats": ...} as numpy arrays.
    """
    config: ml_collections.ConfigDict
    step: int
    model: Any
    variables: Mapping[str, Any]

    @classmethod
    def from_workdir(cls, workdir: str | Path, step: int | None = None) -> InferenceModel:
        """The checkpoint of `step` (default: the latest) of the run in `workdir`."""
        from fbnet_jax.eval import evaluate  # pylint: disable=g-import-not-at-top  # (cycle)
        config, step = evaluate.checkpoint_config(workdir, step)
        return cls._restore(checkpointing.create_manager(workdir, read_only=True), config, step)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> InferenceModel:
        """A checkpoint directory on its own (`<workdir>/checkpoints/<step>`, copied anywhere)."""
        manager, step = checkpointing.open_checkpoint(path)
        try:
            config = checkpointing.read_config(manager, step)
        except Exception:
            manager.close()
            raise
        return cls._restore(manager, config, step)

    @classmethod
    def _restore(cls, manager, config, step: int) -> InferenceModel:
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
        model, _, _, abstract = state_lib.create_state(config, mesh, abstract=True)
        try:
            state, _ = checkpointing.restore(manager, abstract, step=step)
        finally:
            manager.close()
        variables = {"params": jax.device_get(state.params),
                     "batch_stats": jax.device_get(state.batch_stats)}
        return cls(config=config, step=step, model=model, variables=variables)

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)

    @property
    def aus(self) -> tuple[int, ...]:
        return tuple(int(a) for a in self.config.data.aus)

    def apply(self, images: jax.Array, variables: Mapping[str, Any] | None = None
              ) -> dict[str, jax.Array]:
        """The outputs (`OUTPUTS`) for a float32 batch [B, S, S, 3] already scaled to the model
        input; pure, so it can be jitted, exported or converted. `variables` defaults to the
        checkpoint's (pass them to keep them as arguments rather than constants)."""
        outputs = facebehaviornet.infer(self.model, variables or self.variables, images, OUTPUTS)
        return {name: value.astype(jnp.float32) for name, value in outputs.items()}

    def preprocess(self, images_uint8: np.ndarray) -> np.ndarray:
        """uint8 RGB [B, S, S, 3] (already the model's size) -> the float32 model input."""
        images_uint8 = np.asarray(images_uint8)
        expected = (self.image_size, self.image_size, 3)
        if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4 \
                or images_uint8.shape[1:] != expected:
            raise ValueError(f"expected uint8 images [B, {expected[0]}, {expected[1]}, 3], got "
                             f"{images_uint8.dtype} {list(images_uint8.shape)}")
        return to_model_input(images_uint8)

    def metadata(self) -> dict[str, str]:
        """What a consumer of an exported model needs, as string values (ONNX metadata_props;
        a JSON file beside the other formats)."""
        from fbnet_jax.core.version import __version__  # pylint: disable=g-import-not-at-top
        return {
            "fbnet.expressions": json.dumps(list(taxonomy.EXPRESSIONS)),
            "fbnet.aus": json.dumps(list(self.aus)),
            "fbnet.preprocessing": json.dumps({
                "image_size": self.image_size, "layout": "NHWC", "channels": "RGB",
                "scale": SCALE, "offset": OFFSET,
                "formula": "model input = uint8 pixel * scale + offset"}),
            "fbnet.outputs": json.dumps(OUTPUTS),
            "fbnet.config": self.config.to_json(),
            "fbnet.step": str(self.step),
            "fbnet.version": __version__,
        }
