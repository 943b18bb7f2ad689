"""The network's input scaling: uint8 RGB pixels -> the float32 model input, defined once.

  model input = uint8 pixel · SCALE + OFFSET        (SCALE = 1/128, OFFSET = -1)

i.e. (x - 128) / 128, the paper's scaling to [-1, 1). Training and evaluation (on the device:
data_pipelines/device_augment.py), inference and every export (fbnet_jax/serve/inference.py) use
`to_model_input`, and
an exported model's metadata states SCALE and OFFSET, so no consumer has to know the formula.

1/128 is a power of two, so the result is exact in float32: 0 -> -1, 128 -> 0, 255 -> 127/128.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Model input = uint8 pixel * SCALE + OFFSET: 0 -> -1, 128 -> 0, 255 -> 127/128.
SCALE = 1.0 / 128.0
OFFSET = -1.0


def to_model_input(images: Any) -> Any:
    """uint8 pixels (any shape) -> the float32 model input, exactly.

    Takes a numpy array or a jax array (also a traced one, inside a jitted step) and returns one
    of the same kind: it uses only `astype`, `*` and `+`, which both define.

    Raises:
      TypeError: `images` is not uint8 (scaling twice, or a float image, would go unnoticed).
    """
    if images.dtype != np.uint8:
        raise TypeError(f"the model input is made from uint8 pixels, got {images.dtype}")
    return images.astype(np.float32) * np.float32(SCALE) + np.float32(OFFSET)
