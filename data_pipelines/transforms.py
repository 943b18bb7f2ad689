"""Grain transforms between a source's record and the batch the train step sees.

Each transform works alone on one record (a dict per `data_pipelines.schema`) and returns a new
dict; none mutates its input, because a source may hand out the same object twice (a cache, a
repeated index). The pipeline chains them in this order:

  DecodeImage -> ResizeImage -> [ValidateRecord] -> batch (`batching.collate`: stacks the
  batch fields and turns label sentinels into masks, vectorised over the batch)

Images stay uint8 at the training size all the way to the device: the train step augments and
normalises them there (data_pipelines/device_augment.py), so the host does no float work on a
face. `RandomAugment` is the host-side augmentation the pipeline ran before (numpy and OpenCV,
per record); nothing in the pipeline uses it now. It is kept as the reference that the device
augmentation is tested against (tests/test_device_augment.py) and that the benchmarks time the
old path with (benchmarks/input_sources.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import cv2
import grain
import numpy as np

from data_pipelines import device_augment, schema

# The field that carries an encoded (JPEG/PNG) image until `DecodeImage` replaces it by `image`.
IMAGE_BYTES = "image_bytes"


def _key(record: Mapping[str, Any]) -> str:
    return str(record.get(schema.KEY, "<no key>"))


class DecodeImage(grain.transforms.Map):
    """Decodes `image_bytes` (JPEG, PNG, ...) into a uint8 RGB `image`.

    Records that already carry `image` and no `image_bytes` pass through unchanged. Grayscale
    inputs come out as 3 identical channels and an alpha channel is dropped, so every decoded
    image has the schema's [H, W, 3] shape.
    """

    def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
        if IMAGE_BYTES not in record:
            return dict(record)
        out = {k: v for k, v in record.items() if k != IMAGE_BYTES}
        data = np.frombuffer(bytes(record[IMAGE_BYTES]), np.uint8)
        # cv2.imdecode returns None (it does not raise) on bytes it cannot parse.
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if bgr is None:
            raise ValueError(
                f"record {_key(record)!r}: cannot decode image_bytes ({data.size} bytes) as an "
                "image")
        out[schema.IMAGE] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return out


class ResizeImage(grain.transforms.Map):
    """Resizes `image` to size x size.

    INTER_AREA when shrinking (it averages, so no aliasing), INTER_LINEAR when growing; an image
    that already has the size is passed through without a copy. Non-square inputs are stretched:
    face crops are square by construction in every source, and a stretch keeps the whole face.
    """

    def __init__(self, size: int):
        if size <= 0:
            raise ValueError(f"image size must be positive, got {size}")
        self.size = int(size)

    def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
        image = record[schema.IMAGE]
        height, width = image.shape[:2]
        if (height, width) == (self.size, self.size):
            return dict(record)
        shrinking = height >= self.size and width >= self.size
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        resized = cv2.resize(np.ascontiguousarray(image), (self.size, self.size),
                             interpolation=interpolation)
        return {**record, schema.IMAGE: resized}


@dataclasses.dataclass(frozen=True)
class RandomAugment(grain.transforms.RandomMap):
    """Label-preserving photometric and geometric jitter of a uint8 face image.

    Every parameter set to 0 switches its part off; with all of them 0 the record is returned
    unchanged. The same six uniforms are drawn for every record whatever the parameters, so
    switching one part off does not change the draws of the others.

    A horizontal flip keeps every label: the 7 expressions and valence/arousal are symmetric, and
    the AU list codes each AU for both sides of the face (no left/right variants).

    The parameters, their meanings and checks are `device_augment.DeviceAugment`'s.
    """
    flip: float = 0.5
    max_shift: float = 0.0
    max_scale: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self):
        device_augment.DeviceAugment(self.flip, self.max_shift, self.max_scale, self.brightness,
                                     self.contrast)   # raises ValueError on a bad parameter

    def random_map(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        u = rng.random(6)
        image = record[schema.IMAGE]
        changed = False
        if u[0] < self.flip:
            image = image[:, ::-1]
            changed = True
        if self.max_shift or self.max_scale:
            image = self._warp(np.ascontiguousarray(image), u[1:4])
            changed = True
        if self.brightness or self.contrast:
            image = self._photometric(image, u[4:6])
            changed = True
        if not changed:
            return dict(record)
        return {**record, schema.IMAGE: np.ascontiguousarray(image)}

    def _warp(self, image: np.ndarray, u: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        scale = 1.0 + self.max_scale * (2.0 * u[0] - 1.0)
        shift_x = self.max_shift * (2.0 * u[1] - 1.0) * width
        shift_y = self.max_shift * (2.0 * u[2] - 1.0) * height
        # Zoom about the image centre, then translate: one resampling for both.
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        matrix = np.array([[scale, 0.0, (1.0 - scale) * cx + shift_x],
                           [0.0, scale, (1.0 - scale) * cy + shift_y]], np.float32)
        return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT_101)

    def _photometric(self, image: np.ndarray, u: np.ndarray) -> np.ndarray:
        offset = self.brightness * (2.0 * u[0] - 1.0) * 255.0
        factor = 1.0 + self.contrast * (2.0 * u[1] - 1.0)
        pixels = image.astype(np.float32)
        mean = pixels.mean()
        pixels = (pixels - mean) * factor + mean + offset
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


class ValidateRecord(grain.transforms.Map):
    """Checks a decoded record against the schema (`schema.validate_record`), passing it on.

    Costs a few numpy checks per record, so the pipeline inserts it only when
    `config.data.validate_records` is set: for a new source, not every run.
    """

    def __init__(self, num_aus: int):
        self.num_aus = int(num_aus)

    def map(self, record: Mapping[str, Any]) -> Mapping[str, Any]:
        schema.validate_record(record, self.num_aus)
        return record
