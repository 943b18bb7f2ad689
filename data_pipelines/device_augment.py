"""Training's augmentation and normalisation on the accelerator, vectorised over the batch.

The device-side twin of `transforms.RandomAugment` followed by `transforms.Normalize`: it takes
the batch's uint8 faces [B, H, W, 3] inside the jitted train step and returns the float32 model
input (`fbnet_jax.core.images.to_model_input`), so the host ships 1 byte a pixel instead of 4
and the host's per-example OpenCV work becomes one fused device program. Evaluation, which does
not augment, uses `normalize`.

Each example is augmented as `RandomAugment` does: the same five parameters with the same
meanings and checks, the same six uniforms per example (u[0] flip, u[1:4] zoom and shift,
u[4:6] brightness and contrast, drawn whatever is switched on), a flip, a zoom about the image
centre and a shift in one bilinear resampling with a reflect-101 border, then brightness and
contrast about the image's mean, each result rounded and clipped to uint8. The
uniforms come from a PRNG key per example (`example_keys`), a function of the seed, the step and
the example's row in the global batch.

The arithmetic is exact integer fixed point, so an example's result is bit for bit the same
whatever else is in the batch, on one device or many, jitted or not. In float32 it would not
be: XLA contracts a multiply and an add into one fused multiply-add where it fuses them, which
depends on the program's shapes and sharding, and a float32 bilinear interpolation rounds about
one pixel in 20,000 differently on eight devices than on one. Each random parameter goes from its
uniform to an integer by one product and one rounding, where nothing can be contracted: the
zoom in 1/4096, the shift in 1/256 pixel, the contrast factor in 1/16384 and the brightness
offset in 2^-20 of a grey level. Source positions are in 1/256 pixel, bilinear weights are
integers and halves round up.

It is not bit-identical to the host path and does not try to be: the uniforms come from JAX's
PRNG instead of numpy's (other draws, the same distribution), OpenCV's `warpAffine`
interpolates in float32 with its own rounding, and the host's contrast runs in float64. For the
same uniforms the two agree to 0.06 of a grey level on average on face images and to a few
levels on sharp edges (tests/test_device_augment.py measures it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from fbnet_jax.core import images as core_images

# Folded into the seed's key before anything else, so that the augmentation's keys are a
# stream of their own and never coincide with another use of the same seed (parameter init,
# dropout).
STREAM = 0xDA06
# Uniforms per example, as `transforms.RandomAugment` draws them.
NUM_UNIFORMS = 6

# Fixed-point units (module docstring): source positions in 1/2^8 pixel, the zoom in 1/2^12,
# the contrast factor in 1/2^14, the image mean in 1/2^6 and the photometric result in 2^-20 of
# a grey level. Every int32 intermediate stays below 2^31 for sides up to _MAX_SIDE pixels
# (the warp's positions bound it; the image sum alone would allow about 1,670).
_SUBPIXEL_BITS = 8
_SCALE_BITS = 12
_GAIN_BITS = 14
_MEAN_BITS = 6
_MAX_SIDE = (1 << 31) // (3 << (_SUBPIXEL_BITS + _SCALE_BITS))
_VALUE_BITS = _MEAN_BITS + _GAIN_BITS


def example_keys(seed: int, step, rows) -> jax.Array:
    """One PRNG key per example: the seed's augmentation stream, folded with step and row.

    key = fold_in(fold_in(fold_in(key(seed), STREAM), step), row). For a fixed global batch
    size G, (step, row) names the same example as its index step·G + row in the training
    stream, so an example's augmentation is a function of the config and the step alone,
    however the global batch is split over devices and processes. The two are folded in one
    after the other, so step·G + row is never formed (it would overflow int32 within a run).

    Args:
      seed: the run's seed (`config.seed`), a Python int.
      step: the train step, an integer scalar; may be traced (the train state's `step`).
      rows: int32 [B], each example's row in the global batch, 0..G-1; may be traced. A sharded
        global batch passes arange(G), a pmap device d of b rows offset + arange(b).

    Returns:
      a typed key array [B] (threefry2x32, whatever JAX's default implementation).
    """
    key = jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), STREAM)
    key = jax.random.fold_in(key, step)
    return jax.vmap(lambda row: jax.random.fold_in(key, row))(jnp.asarray(rows))


def normalize(images) -> jax.Array:
    """uint8 images (a jax array, or numpy) -> the float32 model input: evaluation's path."""
    return core_images.to_model_input(jnp.asarray(images))


def _fixed(value: jax.Array, bits: int) -> jax.Array:
    """value · 2^bits rounded to an int32 (a product, then a rounding: nothing to contract)."""
    return jnp.round(value * float(2 ** bits)).astype(jnp.int32)


def _reflect101(index: jax.Array, size: int) -> jax.Array:
    """Reflect-101 (OpenCV's BORDER_REFLECT_101, `map_coordinates`' mode "mirror"): d c b|a b
    c d|c b a."""
    period = 2 * (size - 1)
    return (size - 1) - jnp.abs(index % period - (size - 1))


def _source_positions(size: int, scale: jax.Array, shift: jax.Array) -> jax.Array:
    """Where each output pixel along one axis samples the input, in 1/256 pixel (int32 [size]).

    The inverse of `RandomAugment._warp`'s map: position = centre + (out - centre - shift) /
    scale with centre (size - 1) / 2 (pixel centres at integer coordinates, as in OpenCV),
    rounded half up.

    Args:
      size: the image side along this axis, at most _MAX_SIDE.
      scale: the zoom in 1/4096 (int32 scalar, positive).
      shift: the translation in 1/256 pixel (int32 scalar).
    """
    half = 1 << (_SUBPIXEL_BITS - 1)
    # 256·(out - centre) - shift, in whole 1/256 pixels.
    offsets = half * (2 * jnp.arange(size, dtype=jnp.int32) - (size - 1)) - shift
    # offsets / scale rounded half up: floor((2·offsets·4096 + scale) / (2·scale)).
    return half * (size - 1) + (offsets * (2 << _SCALE_BITS) + scale) // (2 * scale)


def _interpolate(pixels: jax.Array, positions: jax.Array) -> jax.Array:
    """Linear interpolation of int32 `pixels` along axis 0 at 1/256-pixel `positions`, in
    1/256 of a value, reflect-101 outside: every gathered slice is contiguous."""
    unit = 1 << _SUBPIXEL_BITS
    low, fraction = positions >> _SUBPIXEL_BITS, (positions & (unit - 1))[:, None, None]
    size = pixels.shape[0]
    return (pixels[_reflect101(low, size)] * (unit - fraction)
            + pixels[_reflect101(low + 1, size)] * fraction)


def _resample(image: jax.Array, rows: jax.Array, columns: jax.Array) -> jax.Array:
    """Bilinear samples of a uint8 image [H, W, C] at the 1/256-pixel positions rows [H'] ×
    columns [W'], reflect-101 outside; uint8 [H', W', C], exact in int32, halves up.

    Columns first, on the transposed image, so that both passes gather whole rows (1.5 to 3
    times faster on a CPU than gathering single pixels for the columns).
    """
    by_column = _interpolate(jnp.swapaxes(image, 0, 1).astype(jnp.int32), columns)
    out = _interpolate(jnp.swapaxes(by_column, 0, 1), rows)
    return ((out + (1 << (2 * _SUBPIXEL_BITS - 1))) >> (2 * _SUBPIXEL_BITS)).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class DeviceAugment:
    """`transforms.RandomAugment`'s jitter of uint8 faces, for a batch on the device.

    Frozen and hashable, so it can be a static argument of a jitted function or closed over by
    the train step. A parameter set to 0 switches its part off, statically: the part is left
    out of the compiled program. The same six uniforms are drawn for every example whatever the
    parameters, so switching one part off does not change the draws of the others.

    Attributes:
      flip: probability of a horizontal flip, in [0, 1].
      max_shift: largest translation, as a fraction of the image side, in each direction.
      max_scale: largest zoom in or out, as a fraction (0.08 -> scale in [0.92, 1.08]); zooming in
        crops, zooming out fills the border by reflection (reflect-101, as on the host).
      brightness: largest brightness offset, as a fraction of the 0..255 range.
      contrast: largest contrast change, as a fraction (0.15 -> factor in [0.85, 1.15]) about the
        image's mean intensity.
    """
    flip: float = 0.5
    max_shift: float = 0.0
    max_scale: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"flip probability must lie in [0, 1], got {self.flip}")
        for name in ("max_shift", "max_scale", "brightness", "contrast"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"augmentation {name} must lie in [0, 1), got {value}")

    @classmethod
    def from_config(cls, augment_config: ml_collections.ConfigDict) -> DeviceAugment:
        """The augmentation of `config.data.augment`."""
        return cls(flip=float(augment_config.flip), max_shift=float(augment_config.max_shift),
                   max_scale=float(augment_config.max_scale),
                   brightness=float(augment_config.brightness),
                   contrast=float(augment_config.contrast))

    def augment(self, images: jax.Array, keys: jax.Array) -> jax.Array:
        """Augments a batch of uint8 faces and scales it to the model input.

        Args:
          images: uint8 [B, H, W, 3].
          keys: [B] PRNG keys, one per example (`example_keys`).

        Returns:
          float32 [B, H, W, 3], `to_model_input` of the augmented uint8 faces.

        Raises:
          ValueError: a side is over _MAX_SIDE pixels (the fixed point would overflow int32).
        """
        if max(images.shape[1:3]) > _MAX_SIDE:
            raise ValueError(f"device augmentation takes images of at most {_MAX_SIDE} pixels a "
                             f"side, got {images.shape[1]}x{images.shape[2]}")
        uniforms = jax.vmap(lambda key: jax.random.uniform(key, (NUM_UNIFORMS,)))(keys)
        return core_images.to_model_input(jax.vmap(self._augment_one)(images, uniforms))

    def _augment_one(self, image: jax.Array, u: jax.Array) -> jax.Array:
        """One uint8 face [H, W, 3] augmented with its six uniforms `u`; uint8 [H, W, 3]."""
        flip = u[0] < self.flip
        if self.max_shift or self.max_scale:
            image = self._warp(image, u[1:4], flip)
        elif self.flip:
            image = jnp.where(flip, image[:, ::-1], image)
        if self.brightness or self.contrast:
            image = self._photometric(image, u[4:6])
        return image

    def _warp(self, image: jax.Array, u: jax.Array, flip: jax.Array) -> jax.Array:
        """Flip (if `flip`), zoom about the centre, then shift (u: scale, shift x, shift y), in
        one resampling: the flip mirrors the source positions, not the image (the same result,
        one pass less)."""
        height, width = image.shape[:2]
        t = 2.0 * u - 1.0
        scale = (1 << _SCALE_BITS) + _fixed(self.max_scale * t[0], _SCALE_BITS)
        shift_x = _fixed(self.max_shift * width * t[1], _SUBPIXEL_BITS)
        shift_y = _fixed(self.max_shift * height * t[2], _SUBPIXEL_BITS)
        columns = _source_positions(width, scale, shift_x)
        columns = jnp.where(flip, ((width - 1) << _SUBPIXEL_BITS) - columns, columns)
        return _resample(image, _source_positions(height, scale, shift_y), columns)

    def _photometric(self, image: jax.Array, u: jax.Array) -> jax.Array:
        """Brightness offset and contrast about the image's mean (u: brightness, contrast).

        value = (pixel - mean) · factor + mean + offset, in 2^-20 of a grey level, rounded half
        up and clipped to uint8; the mean is over all pixels and channels, rounded to 1/64.
        """
        t = 2.0 * u - 1.0
        gain = (1 << _GAIN_BITS) + _fixed(self.contrast * t[1], _GAIN_BITS)
        offset = _fixed(self.brightness * 255.0 * t[0], _VALUE_BITS)
        total, count = jnp.sum(image, dtype=jnp.int32), image.size
        mean = ((total // count) << _MEAN_BITS) + (
            ((total % count) << _MEAN_BITS) + count // 2) // count
        pixels = image.astype(jnp.int32) << _MEAN_BITS
        value = (pixels - mean) * gain + (mean << _GAIN_BITS) + offset
        return jnp.clip((value + (1 << (_VALUE_BITS - 1))) >> _VALUE_BITS, 0, 255
                        ).astype(jnp.uint8)
