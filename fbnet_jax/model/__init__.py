"""FaceBehaviorNet and its backbones."""

from fbnet_jax.model.facebehaviornet import (BACKBONES, DTYPES, FaceBehaviorNet, create_model,
                                             infer)

__all__ = ["BACKBONES", "DTYPES", "FaceBehaviorNet", "create_model", "infer"]
