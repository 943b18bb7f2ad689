"""FaceBehaviorNet and its backbones."""

from fbnet_jax.models.facebehaviornet import BACKBONES, FaceBehaviorNet, create_model

__all__ = ["BACKBONES", "FaceBehaviorNet", "create_model"]
