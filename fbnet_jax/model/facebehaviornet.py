"""FaceBehaviorNet: one backbone, three heads (expressions, action units, valence-arousal).

Also the one way the network runs in inference mode (`infer`), shared by evaluation and serving.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fbnet_jax.model import backbones

BACKBONES = {"small_cnn": backbones.SmallCNN, "vgg_face": backbones.VGGFace,
             "resnet50": backbones.ResNet50}
BATCH_NORM_BACKBONES = ("small_cnn", "resnet50")
# Computation dtypes of the backbone (parameters and heads stay float32).
DTYPES = ("float32", "bfloat16", "float16")


class FaceBehaviorNet(nn.Module):
    """Maps image [B, H, W, 3] (pixels scaled to [-1, 1]) to the outputs of docs/design.md#model.

    Returns a dict: `expression_logits` [B, num_expressions], `au_logits` [B, num_aus],
    `va` [B, 2] in (-1, 1) (tanh) and `features` [B, D]. Heads compute in float32 whatever the
    backbone dtype, so the losses never see reduced precision.

    Attributes:
      backbone: a key of BACKBONES.
      backbone_kwargs: keyword arguments of the backbone module (widths, dropout, ...).
      num_expressions: size of the expression head.
      num_aus: size of the AU head.
      dtype: computation dtype of the backbone.
      bn_axis_name: under `jax.pmap`, the axis over which BatchNorm averages batch statistics
        (so every device normalises with the statistics of the whole batch, as under jit).
        None otherwise; the backbones without BatchNorm ignore it.
    """
    backbone: str = "small_cnn"
    backbone_kwargs: Mapping[str, Any] | None = None
    num_expressions: int = 7
    num_aus: int = 17
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, image, *, train: bool = False):
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {sorted(BACKBONES)}")
        kwargs = dict(self.backbone_kwargs or {})
        if self.bn_axis_name is not None and self.backbone in BATCH_NORM_BACKBONES:
            kwargs["bn_axis_name"] = self.bn_axis_name
        features = BACKBONES[self.backbone](dtype=self.dtype, name="backbone", **kwargs)(
            image, train=train)
        features = features.astype(jnp.float32)
        return {
            "expression_logits": nn.Dense(self.num_expressions, name="expression_head")(features),
            "au_logits": nn.Dense(self.num_aus, name="au_head")(features),
            "va": jnp.tanh(nn.Dense(2, name="va_head")(features)),
            "features": features,
        }


def create_model(model_config, num_aus: int) -> FaceBehaviorNet:
    """Builds the model from `config.model` (backbone name, its settings, dtype)."""
    if model_config.dtype not in DTYPES:
        raise ValueError(f"unknown model dtype {model_config.dtype!r}; known: {DTYPES}")
    return FaceBehaviorNet(
        backbone=model_config.backbone,
        backbone_kwargs=dict(model_config.backbones[model_config.backbone]),
        num_expressions=model_config.num_expressions,
        num_aus=num_aus,
        dtype=jnp.dtype(model_config.dtype),
    )


def infer(model: FaceBehaviorNet, variables: Mapping[str, Any], images,
          keys: Iterable[str] | None = None) -> dict[str, Any]:
    """The network in inference mode: BatchNorm with its running statistics, no dropout.

    Pure, so it can be jitted, exported or converted.

    Args:
      model: the FaceBehaviorNet.
      variables: {"params": ..., "batch_stats": ...} (batch_stats empty for a backbone without
        BatchNorm).
      images: float32 [B, H, W, 3], already the model input (`fbnet_jax.core.images`).
      keys: the outputs to return, in this order; None: all of them.

    Returns:
      The outputs of `FaceBehaviorNet.__call__` named by `keys`.
    """
    outputs = model.apply(dict(variables), images, train=False)
    return dict(outputs) if keys is None else {key: outputs[key] for key in keys}
