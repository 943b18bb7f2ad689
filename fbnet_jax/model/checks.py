"""The checks of `config.model`: a known backbone and dtype, and a network that builds.

Gathered with every other layer's by `fbnet_jax.train.checks.validate`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fbnet_jax.core import checks, taxonomy
from fbnet_jax.model import facebehaviornet, weights


def problems(config: ml_collections.ConfigDict) -> list[str]:
    """What is wrong with `config.model`, one line each (a weights file is looked at, not read)."""
    out: list[str] = []
    model = config.model
    if model.backbone not in facebehaviornet.BACKBONES:
        out.append(f"model.backbone: unknown backbone {model.backbone!r}; known: "
                   f"{', '.join(facebehaviornet.BACKBONES)}")
    elif model.backbone not in model.backbones:
        out.append(f"model.backbones.{model.backbone}: missing (the settings of the chosen "
                   f"backbone)")
    checks.one_of(out, "model.dtype", model.dtype, facebehaviornet.DTYPES)
    if model.num_expressions != len(taxonomy.EXPRESSIONS):
        out.append(f"model.num_expressions: must be {len(taxonomy.EXPRESSIONS)} (the "
                   f"expressions {', '.join(taxonomy.EXPRESSIONS)}), got "
                   f"{model.num_expressions!r}")
    if model.init_from:
        problem = weights.init_from_problem(model.init_from, model.backbone)
        if problem:
            out.append(f"model.init_from: {problem}")
    return out


def build_problems(config: ml_collections.ConfigDict) -> list[str]:
    """The model must accept the configured image size (e.g. VGG-FACE's five pools need 32 px).

    Asked only of a config whose model fields, image size and AU list passed their checks.
    """
    try:
        model = facebehaviornet.create_model(config.model, num_aus=len(config.data.aus))
        size = config.data.image_size
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                                          train=False))
    except Exception as e:  # pylint: disable=broad-except  # any failure to build is the message
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return [f"model: a {config.model.backbone} with these settings cannot take "
                f"{config.data.image_size}x{config.data.image_size} images "
                f"(data.image_size): {first_line}"]
    return []
