"""data_pipelines.device_augment: the batch's augmentation inside the step, against the host's.

Exact where the device path is exact (normalisation, flips, keys, the resampling against
`map_coordinates`, and an example's result whatever the batch, jit or sharding); within a
measured tolerance of `transforms.RandomAugment` for the same uniforms (OpenCV's float32
interpolation, the host's float64 contrast)."""

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy import ndimage

from conftest import load_config, run_isolated
from data_pipelines import device_augment
from data_pipelines import schema
from data_pipelines import synthetic
from data_pipelines import transforms
from fbnet_jax.core import images

FULL = dict(flip=0.5, max_shift=0.1, max_scale=0.1, brightness=0.2, contrast=0.2)
OFF = dict(flip=0.0, max_shift=0.0, max_scale=0.0, brightness=0.0, contrast=0.0)


def _images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _faces(n, size):
    source = synthetic.SyntheticFaces(synthetic.SyntheticSpec(num_records=n, image_size=size),
                                      split="test")
    return np.stack([source[i][schema.IMAGE] for i in range(n)])


def _uniforms(keys):
    # The draw `DeviceAugment.augment` makes per example: six float32 uniforms from its key.
    return np.asarray(jax.vmap(lambda key: jax.random.uniform(key, (6,)))(keys))


class _Uniforms:
    """A stand-in for RandomAugment's numpy Generator that hands out given uniforms."""

    def __init__(self, u):
        self.u = np.asarray(u, np.float64)

    def random(self, n):
        assert n == len(self.u)
        return self.u


@jax.jit(static_argnums=(0, 4))
def _jitted(augment, batch, rows, step, seed):
    return augment.augment(batch, device_augment.example_keys(seed, step, rows))


def _augmented(augment, batch, rows, step=3, seed=0):
    # Jitted, as in the train step (the step traced).
    return np.asarray(_jitted(augment, batch, jnp.asarray(rows), jnp.int32(step), seed))


def test_shapes_dtype_range_and_uint8_grid():
    batch = _images(8, 24)
    out = _augmented(device_augment.DeviceAugment(**FULL), batch, jnp.arange(8))
    assert out.shape == (8, 24, 24, 3) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 127 / 128
    # Every value is a rounded uint8 pixel's model input, as the host's.
    np.testing.assert_array_equal(out * 128, np.round(out * 128))
    assert not np.array_equal(out, images.to_model_input(batch))


def test_all_off_is_the_normalisation_and_flip_only_mirrors():
    batch = _images(6)
    rows = jnp.arange(6)
    off = _augmented(device_augment.DeviceAugment(**OFF), batch, rows)
    np.testing.assert_array_equal(off, images.to_model_input(batch))
    flipped = _augmented(device_augment.DeviceAugment(**{**OFF, "flip": 1.0}), batch, rows)
    np.testing.assert_array_equal(flipped, images.to_model_input(batch[:, :, ::-1]))


def test_a_flip_with_the_warp_is_the_warp_of_the_mirrored_image():
    # The warp mirrors its source positions instead of the image: the same bits.
    batch = _images(8, 20, seed=6)
    keys = device_augment.example_keys(0, 2, jnp.arange(8))
    params = dict(max_shift=0.2, max_scale=0.3, brightness=0.1)
    flipped = device_augment.DeviceAugment(flip=1.0, **params).augment(batch, keys)
    mirrored = device_augment.DeviceAugment(flip=0.0, **params).augment(batch[:, :, ::-1], keys)
    np.testing.assert_array_equal(np.asarray(flipped), np.asarray(mirrored))


def test_flip_probability_follows_the_first_uniform():
    batch = _images(64)
    keys = device_augment.example_keys(0, 0, jnp.arange(64))
    out = np.asarray(device_augment.DeviceAugment(**{**OFF, "flip": 0.5}).augment(batch, keys))
    flips = _uniforms(keys)[:, 0] < 0.5
    assert 10 < flips.sum() < 54
    np.testing.assert_array_equal(out[flips], images.to_model_input(batch[flips, :, ::-1]))
    np.testing.assert_array_equal(out[~flips], images.to_model_input(batch[~flips]))


def test_normalize_is_the_model_input_of_a_device_array():
    batch = _images(2)
    for given in (batch, jnp.asarray(batch)):
        out = device_augment.normalize(given)
        assert isinstance(out, jax.Array) and out.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(out), images.to_model_input(batch))
    with pytest.raises(TypeError):
        device_augment.normalize(jnp.zeros((1, 4, 4, 3), jnp.float32))


def test_an_example_is_augmented_by_seed_step_and_row_alone():
    augment = device_augment.DeviceAugment(**FULL)
    batch = _images(8, seed=1)
    whole = _augmented(augment, batch, jnp.arange(8), step=5)
    # Example 3 alone, and at position 1 of a batch of 4 with other examples and rows.
    alone = _augmented(augment, batch[3:4], jnp.array([3]), step=5)
    others = np.stack([_images(1, seed=9)[0], batch[3], batch[0], _images(1, seed=8)[0]])
    mixed = _augmented(augment, others, jnp.array([7, 3, 0, 5]), step=5)
    np.testing.assert_array_equal(alone[0], whole[3])
    np.testing.assert_array_equal(mixed[1], whole[3])
    np.testing.assert_array_equal(mixed[2], whole[0])
    # Any other seed, step or row is another augmentation.
    for changed in (dict(seed=1), dict(step=6)):
        assert not np.array_equal(
            _augmented(augment, batch[3:4], jnp.array([3]), **{"step": 5, **changed})[0],
            whole[3])
    assert not np.array_equal(_augmented(augment, batch[3:4], jnp.array([4]), step=5)[0],
                              whole[3])


def test_jit_and_op_by_op_give_the_same_bits():
    # Float32 interpolation differed here in about 1 pixel in 20,000 (fused multiply-adds).
    augment = device_augment.DeviceAugment(**FULL)
    batch = _images(32, 48, seed=4)
    for step in range(3):
        op_by_op = augment.augment(batch, device_augment.example_keys(0, step, jnp.arange(32)))
        np.testing.assert_array_equal(np.asarray(op_by_op),
                                      _augmented(augment, batch, jnp.arange(32), step=step))


def test_switching_a_part_off_keeps_the_other_draws():
    batch = _images(4, seed=2)
    rows = jnp.arange(4)
    with_flip = _augmented(device_augment.DeviceAugment(flip=1.0, brightness=0.2), batch, rows)
    without = _augmented(device_augment.DeviceAugment(flip=0.0, brightness=0.2), batch, rows)
    np.testing.assert_array_equal(with_flip, without[:, :, ::-1])
    assert not np.array_equal(without, images.to_model_input(batch))


def test_keys_are_the_seeds_own_stream_folded_with_step_and_row():
    rows = jnp.array([0, 5, 2**31 - 1], jnp.int32)
    keys = jax.jit(device_augment.example_keys, static_argnums=0)(7, jnp.int32(2**31 - 1), rows)
    stream = jax.random.fold_in(jax.random.key(7), device_augment.STREAM)
    for key, row in zip(keys, rows):
        expected = jax.random.fold_in(jax.random.fold_in(stream, 2**31 - 1), row)
        np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(expected))
        # Not the keys of the seed's other uses (fold_in of the step, as the step's dropout).
        plain = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 2**31 - 1), row)
        assert not np.array_equal(jax.random.key_data(key), jax.random.key_data(plain))
    data = jax.random.key_data(device_augment.example_keys(7, 0, jnp.arange(64)))
    assert len({tuple(k) for k in np.asarray(data).tolist()}) == 64


def test_warp_matches_opencv_on_a_ramp():
    # Bilinear interpolation reproduces a linear ramp, so the two differ only where a value lies
    # near .5: not at all for the three draws of `exact` (a zoom of 1/2 puts every position on a
    # half, whose ties both round up), by a level here and there for random draws. A pixel-centre
    # or border convention that differed (half a pixel, BORDER_REFLECT's repeated edge pixel)
    # would move whole regions by 2 levels or more.
    y, x = np.mgrid[0:40, 0:40]
    ramp = np.stack([3 * x, 3 * y, (3 * x + 3 * y) // 2], -1).astype(np.uint8)
    params = dict(flip=0.0, max_shift=0.3, max_scale=0.5)
    host = transforms.RandomAugment(**params)
    warp = jax.jit(jax.vmap(device_augment.DeviceAugment(**params)._warp, (None, 0, None)))
    exact = np.array([[0.0, 0.0, 1.0], [0.3, 0.9, 0.6], [0.7, 0.2, 0.1]], np.float32)
    for out, u in zip(np.asarray(warp(ramp, exact, False)), exact.astype(np.float64)):
        np.testing.assert_array_equal(out, host._warp(ramp, u), err_msg=str(u))
    generic = np.asarray(jax.random.uniform(jax.random.key(0), (8, 3)))
    differences = np.stack([np.abs(out.astype(int) - host._warp(ramp, u))
                            for out, u in zip(np.asarray(warp(ramp, generic, False)),
                                              generic.astype(np.float64))])
    # Measured: at most 1, 0.02 on average.
    assert differences.max() <= 1 and differences.mean() <= 0.04, differences.mean()


def test_augment_matches_the_host_for_the_same_uniforms():
    # Synthetic faces (sharp painted edges) at the paper's 112 px. OpenCV interpolates in
    # float32 with its own rounding of positions and values, which moves a pixel on a sharp edge
    # by a few levels: measured at most 5, 0.06 on average.
    params = dict(flip=0.5, max_shift=0.06, max_scale=0.08, brightness=0.15, contrast=0.15)
    faces = _faces(32, 112)
    keys = device_augment.example_keys(0, 11, jnp.arange(32))
    device = np.asarray(device_augment.DeviceAugment(**params).augment(faces, keys)) * 128 + 128
    host_augment = transforms.RandomAugment(**params)
    host = np.stack([host_augment.random_map({schema.IMAGE: face}, _Uniforms(u))[schema.IMAGE]
                     for face, u in zip(faces, _uniforms(keys))])
    difference = np.abs(device - host)
    assert difference.max() <= 6 and difference.mean() <= 0.1, (
        difference.max(), difference.mean())


def test_photometric_matches_the_host_to_rounding_ties():
    # The host computes in float64, the device in fixed point (the factor to 2^-14, the mean to
    # 1/64): only a pixel within ~0.01 of a .5 tie may round the other way (measured: 6 of
    # 27,648).
    params = dict(brightness=0.2, contrast=0.2)
    batch = _images(16, 24, seed=3)
    u = np.asarray(jax.random.uniform(jax.random.key(1), (16, 2)))
    device = np.asarray(jax.jit(jax.vmap(
        device_augment.DeviceAugment(**params)._photometric))(batch, u)).astype(int)
    host_augment = transforms.RandomAugment(**params)
    host = np.stack([host_augment._photometric(image, ui.astype(np.float64))
                     for image, ui in zip(batch, u)])
    difference = np.abs(device - host)
    assert difference.max() <= 1 and (difference > 0).mean() <= 1e-3


def test_parts_switched_off_leave_the_program():
    batch = jnp.asarray(_images(2))
    keys = device_augment.example_keys(0, 0, jnp.arange(2))

    def program(**params):
        return str(jax.make_jaxpr(device_augment.DeviceAugment(**params).augment)(batch, keys))

    flip_only = program(**{**OFF, "flip": 0.5})
    assert "gather" not in flip_only and "reduce_sum" not in flip_only
    assert "gather" in program(**{**OFF, "max_scale": 0.1})
    assert "reduce_sum" in program(**{**OFF, "contrast": 0.1})


def test_resampling_is_map_coordinates_mirror_at_the_same_positions():
    # At positions on the 1/256 grid the float32 reference is exact, so they agree bit for bit;
    # the positions reach far outside the image on both sides (reflect-101 repeated).
    image = _images(1, 20, seed=5)[0]
    rows = jnp.array([-2000, -300, -1, 0, 5, 255, 256, 1000, 4863, 4864, 6000, 9000], jnp.int32)
    columns = jnp.arange(-4000, 9000, 997, dtype=jnp.int32)
    out = np.asarray(device_augment._resample(jnp.asarray(image), rows, columns))
    grid = np.meshgrid(np.asarray(rows) / 256, np.asarray(columns) / 256, indexing="ij")
    for channel in range(3):
        reference = ndimage.map_coordinates(jnp.asarray(image[..., channel], jnp.float32),
                                            [jnp.asarray(g, jnp.float32) for g in grid],
                                            order=1, mode="mirror")
        np.testing.assert_array_equal(out[..., channel], np.floor(np.asarray(reference) + 0.5))


@pytest.mark.parametrize("scale_u, shift_u", [(0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0)])
def test_source_positions_are_exact_up_to_the_largest_side(scale_u, shift_u):
    # The extreme zoom and shift at _MAX_SIDE: the int32 arithmetic does not overflow, and each
    # position is the exact rational one, rounded half up.
    size, bits, subpixel = device_augment._MAX_SIDE, 12, 256
    scale = 4096 + round(0.999 * (2 * scale_u - 1) * 4096)
    shift = round(0.999 * size * (2 * shift_u - 1) * subpixel)
    out = device_augment._source_positions(size, jnp.int32(scale), jnp.int32(shift))
    half = fractions.Fraction(1, 2)
    centre = (size - 1) * half
    expected = [math.floor(subpixel * (centre + (x - centre - fractions.Fraction(shift, subpixel))
                                       / fractions.Fraction(scale, 2 ** bits)) + half)
                for x in range(size)]
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_rejects_images_over_the_largest_side():
    side = device_augment._MAX_SIDE + 1
    with pytest.raises(ValueError, match=f"at most {side - 1} pixels a side, got 4x{side}"):
        device_augment.DeviceAugment(max_scale=0.1).augment(
            jnp.zeros((1, 4, side, 3), jnp.uint8), device_augment.example_keys(0, 0, [0]))


def test_from_config_and_the_same_checks_as_the_host():
    augment_config = load_config("synthetic.py").data.augment
    augment = device_augment.DeviceAugment.from_config(augment_config)
    assert augment == device_augment.DeviceAugment(**augment_config.to_dict())
    assert augment.flip == 0.5 and augment.contrast == 0.15


@pytest.mark.parametrize("bad", [dict(flip=1.5), dict(flip=-0.1), dict(max_shift=-0.1),
                                 dict(max_scale=1.0), dict(brightness=2.0), dict(contrast=1.0)])
def test_rejects_what_the_host_rejects_with_its_message(bad):
    with pytest.raises(ValueError) as host:
        transforms.RandomAugment(**bad)
    with pytest.raises(ValueError) as device:
        device_augment.DeviceAugment(**bad)
    assert str(device.value) == str(host.value)


# The same global batch of 32 on one device, under jit sharded over 8 devices (rows =
# arange(32)) and in pmap (rows = device offset + arange(4)).
_SHARDED_CODE = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from data_pipelines import device_augment

augment = device_augment.DeviceAugment(flip=0.5, max_shift=0.1, max_scale=0.1, brightness=0.2,
                                       contrast=0.2)
batch = np.random.default_rng(0).integers(0, 256, (32, 48, 48, 3), dtype=np.uint8)
step = jnp.int32(9)
run = jax.jit(lambda x, s: augment.augment(x, device_augment.example_keys(3, s, jnp.arange(32))))
one = np.asarray(run(jax.device_put(batch, jax.devices()[0]), step))
sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), P("data"))
sharded = run(jax.device_put(batch, sharding), step)
assert len(sharded.sharding.device_set) == 8
np.testing.assert_array_equal(np.asarray(sharded), one)
rows = lambda: jax.lax.axis_index("data") * 4 + jnp.arange(4)
pmapped = jax.pmap(lambda x, s: augment.augment(x, device_augment.example_keys(3, s, rows())),
                   axis_name="data", in_axes=(0, None))(batch.reshape(8, 4, 48, 48, 3), step)
np.testing.assert_array_equal(np.asarray(pmapped).reshape(one.shape), one)
print("same")
"""


def test_sharded_jit_and_pmap_augment_the_global_batch_as_one_device():
    # Float32 interpolation differed here (fused multiply-adds where the programs differ).
    assert run_isolated(_SHARDED_CODE, devices=8).strip() == "same"
