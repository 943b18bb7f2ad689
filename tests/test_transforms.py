"""Each transform of data_pipelines.transforms alone, on hand-made records."""

import cv2
import grain
import numpy as np
import pytest
from PIL import Image

from data_pipelines import batching, schema
from data_pipelines import transforms
from fbnet_jax.core import images

NUM_AUS = 17


def _image(height=16, width=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _record(image=None, **labels):
    image = _image() if image is None else image
    return schema.make_record(image, key="face/0001.jpg", source=1, **labels)


def _smooth_image(size=32):
    # A smooth image: JPEG reproduces it to within a few levels, unlike noise.
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([x * 255 // (size - 1), y * 255 // (size - 1),
                     np.full_like(x, 90)], -1).astype(np.uint8)


class TestDecodeImage:

    def test_decodes_jpeg_written_by_opencv_to_rgb(self):
        rgb = _smooth_image()
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, 98])
        assert ok
        record = _record(expression=3)
        del record[schema.IMAGE]
        record[transforms.IMAGE_BYTES] = encoded.tobytes()
        out = transforms.DecodeImage().map(record)
        assert transforms.IMAGE_BYTES not in out
        assert out[schema.IMAGE].dtype == np.uint8 and out[schema.IMAGE].shape == (32, 32, 3)
        # Channel order is RGB: mean error stays small only if channels are not swapped.
        assert np.abs(out[schema.IMAGE].astype(int) - rgb).mean() < 4
        assert out[schema.EXPRESSION] == 3 and out[schema.KEY] == "face/0001.jpg"
        assert transforms.IMAGE_BYTES in record  # the input record is left alone

    def test_decodes_png_written_by_pillow_exactly(self, tmp_path):
        rgb = _image(12, 20)
        path = tmp_path / "face.png"
        Image.fromarray(rgb).save(path)
        record = {**_record(), transforms.IMAGE_BYTES: path.read_bytes()}
        np.testing.assert_array_equal(transforms.DecodeImage().map(record)[schema.IMAGE], rgb)

    def test_grayscale_png_becomes_three_channels(self, tmp_path):
        gray = _image()[..., 0]
        path = tmp_path / "gray.png"
        Image.fromarray(gray).save(path)
        out = transforms.DecodeImage().map({**_record(), transforms.IMAGE_BYTES: path.read_bytes()})
        assert out[schema.IMAGE].shape == (16, 16, 3)
        np.testing.assert_array_equal(out[schema.IMAGE][..., 1], gray)

    @pytest.mark.parametrize("data", [b"not an image at all", b"\xff\xd8\xff\xe0garbage", b""])
    def test_corrupt_bytes_raise_naming_the_key(self, data):
        record = {**_record(), transforms.IMAGE_BYTES: data}
        with pytest.raises(ValueError, match="face/0001.jpg"):
            transforms.DecodeImage().map(record)

    def test_record_with_image_passes_through(self):
        record = _record()
        out = transforms.DecodeImage().map(record)
        assert out[schema.IMAGE] is record[schema.IMAGE]


class TestResizeImage:

    @pytest.mark.parametrize("shape", [(40, 40), (8, 8), (30, 12), (16, 16)])
    def test_output_shape_and_dtype(self, shape):
        out = transforms.ResizeImage(16).map(_record(_image(*shape)))
        assert out[schema.IMAGE].shape == (16, 16, 3) and out[schema.IMAGE].dtype == np.uint8

    def test_same_size_is_a_no_op(self):
        record = _record()
        assert transforms.ResizeImage(16).map(record)[schema.IMAGE] is record[schema.IMAGE]

    def test_shrinking_averages(self):
        # INTER_AREA on an exact 2x shrink is the mean of each 2x2 block.
        image = _image(32, 32).astype(np.float64)
        expected = image.reshape(16, 2, 16, 2, 3).mean((1, 3))
        out = transforms.ResizeImage(16).map(_record(image.astype(np.uint8)))[schema.IMAGE]
        assert np.abs(out - expected).max() <= 0.5 + 1e-9

    def test_rejects_bad_size(self):
        with pytest.raises(ValueError):
            transforms.ResizeImage(0)


class TestRandomAugment:

    FULL = dict(flip=0.5, max_shift=0.1, max_scale=0.1, brightness=0.2, contrast=0.2)

    def test_deterministic_given_the_seed(self):
        augment = transforms.RandomAugment(**self.FULL)
        record = _record(_smooth_image(16))
        first = augment.random_map(record, np.random.default_rng(7))[schema.IMAGE]
        again = augment.random_map(record, np.random.default_rng(7))[schema.IMAGE]
        other = augment.random_map(record, np.random.default_rng(8))[schema.IMAGE]
        np.testing.assert_array_equal(first, again)
        assert not np.array_equal(first, other)

    def test_deterministic_inside_grain(self):
        records = [_record(_image(seed=i)) for i in range(6)]
        ds = grain.MapDataset.source(records).random_map(
            transforms.RandomAugment(**self.FULL), seed=3)
        for a, b in zip(ds, ds):
            np.testing.assert_array_equal(a[schema.IMAGE], b[schema.IMAGE])

    def test_preserves_labels_shape_and_dtype(self):
        record = _record(expression=4, au=np.arange(NUM_AUS) % 2, va=[0.5, -0.25], compound=2)
        augment = transforms.RandomAugment(**self.FULL)
        for seed in range(8):
            out = augment.random_map(record, np.random.default_rng(seed))
            assert out[schema.IMAGE].shape == (16, 16, 3)
            assert out[schema.IMAGE].dtype == np.uint8
            for field in (schema.EXPRESSION, schema.AU, schema.VA, schema.COMPOUND,
                          schema.SOURCE, schema.KEY):
                np.testing.assert_array_equal(out[field], record[field])

    def test_all_zero_is_identity(self):
        augment = transforms.RandomAugment(flip=0, max_shift=0, max_scale=0, brightness=0,
                                           contrast=0)
        record = _record()
        for seed in range(5):
            out = augment.random_map(record, np.random.default_rng(seed))
            np.testing.assert_array_equal(out[schema.IMAGE], record[schema.IMAGE])

    def test_flip_only_mirrors(self):
        augment = transforms.RandomAugment(flip=1.0)
        record = _record()
        out = augment.random_map(record, np.random.default_rng(0))
        np.testing.assert_array_equal(out[schema.IMAGE], record[schema.IMAGE][:, ::-1])

    def test_brightness_only_shifts_uniformly(self):
        augment = transforms.RandomAugment(flip=0, brightness=0.2)
        image = np.full((16, 16, 3), 100, np.uint8)
        outs = [augment.random_map(_record(image), np.random.default_rng(s))[schema.IMAGE]
                for s in range(5)]
        # No geometric change: the same offset everywhere, within +-0.2 * 255 of the input.
        assert all(np.ptp(out) == 0 for out in outs)
        values = {int(out[0, 0, 0]) for out in outs}
        assert len(values) > 1 and all(49 <= v <= 151 for v in values)

    def test_parameter_off_keeps_other_draws(self):
        # The same uniforms are drawn whatever is on, so switching flip off changes only the flip.
        record = _record(_smooth_image(16))
        with_flip = transforms.RandomAugment(flip=1.0, brightness=0.2)
        without = transforms.RandomAugment(flip=0.0, brightness=0.2)
        a = with_flip.random_map(record, np.random.default_rng(5))[schema.IMAGE]
        b = without.random_map(record, np.random.default_rng(5))[schema.IMAGE]
        np.testing.assert_array_equal(a, b[:, ::-1])

    @pytest.mark.parametrize("bad", [dict(flip=1.5), dict(max_shift=-0.1), dict(contrast=1.0)])
    def test_rejects_bad_parameters(self, bad):
        with pytest.raises(ValueError):
            transforms.RandomAugment(**bad)


class TestModelInput:

    def test_exact_values(self):
        image = np.array([0, 1, 127, 128, 129, 255], np.uint8)[:, None, None].repeat(3, -1)
        out = images.to_model_input(image)
        assert out.dtype == np.float32
        expected = np.array([-1.0, -127 / 128, -1 / 128, 0.0, 1 / 128, 127 / 128], np.float32)
        np.testing.assert_array_equal(out[:, 0, 0], expected)

    def test_rejects_float_input(self):
        with pytest.raises(TypeError):
            images.to_model_input(np.zeros((4, 4, 3), np.float32))


class TestToMasks:

    def test_all_missing_gives_zero_masks_and_safe_values(self):
        out = schema.to_masks(_record())
        assert out["expression_mask"] == 0 and out[schema.EXPRESSION] == 0
        assert out["compound_mask"] == 0 and out[schema.COMPOUND] == 0
        assert out["va_mask"] == 0
        np.testing.assert_array_equal(out[schema.VA], np.zeros(2, np.float32))
        np.testing.assert_array_equal(out["au_mask"], np.zeros(NUM_AUS, np.float32))
        np.testing.assert_array_equal(out[schema.AU], np.zeros(NUM_AUS, np.float32))
        assert not any(np.isnan(np.asarray(v, np.float64)).any()
                       for k, v in out.items() if k not in (schema.KEY,))

    def test_labels_and_partial_aus(self):
        au = np.full(NUM_AUS, schema.MISSING_AU, np.int8)
        au[:3] = [1, 0, 1]
        out = schema.to_masks(_record(expression=6, au=au, va=[0.25, -0.5], compound=10))
        assert out["expression_mask"] == 1 and out[schema.EXPRESSION] == 6
        assert out["compound_mask"] == 1 and out[schema.COMPOUND] == 10
        assert out["va_mask"] == 1
        np.testing.assert_array_equal(out[schema.VA], [0.25, -0.5])
        np.testing.assert_array_equal(out["au_mask"], [1, 1, 1] + [0] * (NUM_AUS - 3))
        np.testing.assert_array_equal(out[schema.AU], [1, 0, 1] + [0] * (NUM_AUS - 3))
        assert out[schema.AU].dtype == np.float32 and out["au_mask"].dtype == np.float32
        assert out[schema.SOURCE] == 1 and out[schema.KEY] == "face/0001.jpg"


    def test_collate_equals_each_record_masked_then_stacked(self):
        au = np.full(NUM_AUS, schema.MISSING_AU, np.int8)
        au[[0, 5]] = [1, 0]
        records = [_record(), _record(expression=6, au=au, va=[0.25, -0.5], compound=10),
                   _record(expression=0, va=[1.0, 1.0])]
        for row, record in enumerate(records):
            record[schema.ROW] = np.int32(row + 8)
            record["group"] = f"subject-{row}"   # a source's own field: not a batch field
        batch = batching.collate(records)
        one_by_one = [schema.to_masks(record) for record in records]
        assert sorted(batch) == sorted(one_by_one[0])
        assert schema.ROW in batch and "group" not in batch
        for field, value in batch.items():
            expected = np.stack([np.asarray(out[field]) for out in one_by_one])
            assert value.dtype == expected.dtype, field
            np.testing.assert_array_equal(value, expected, err_msg=field)
        np.testing.assert_array_equal(batch["va_mask"], [0, 1, 1])
        np.testing.assert_array_equal(batch[schema.ROW], [8, 9, 10])
        np.testing.assert_array_equal(batch["au_mask"][1, :6], [1, 0, 0, 0, 0, 1])
        assert batch[schema.IMAGE].dtype == np.uint8 and batch[schema.IMAGE].shape[0] == 3


class TestValidateRecord:

    def test_good_record_passes_through(self):
        record = _record(expression=1)
        assert transforms.ValidateRecord(NUM_AUS).map(record) is record

    def test_bad_record_raises_naming_the_key(self):
        record = _record(expression=9)
        with pytest.raises(ValueError, match="face/0001.jpg"):
            transforms.ValidateRecord(NUM_AUS).map(record)

    def test_wrong_au_count_raises(self):
        with pytest.raises(ValueError, match="au must have shape"):
            transforms.ValidateRecord(12).map(_record())
