"""benchmarks/compare_convolutions.py: the convolutions it finds are the model's, and both sides
compute the same three convolutions for each."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, load_benchmark

torch = pytest.importorskip("torch")


convs = load_benchmark("compare_convolutions")
SAME = ((1, 1), (1, 1))


def _summary(found):
    return [(c["input"], c["kernel"], c["strides"], c["padding"], c["count"], c["first"])
            for c in found]


def test_small_cnn_convolutions():
    assert _summary(convs.convolutions("small_cnn", 32, 2)) == [
        ((2, 32, 32, 3), (3, 3, 3, 16), (1, 1), SAME, 1, True),
        ((2, 16, 16, 16), (3, 3, 16, 32), (1, 1), SAME, 1, False),
        ((2, 8, 8, 32), (3, 3, 32, 64), (1, 1), SAME, 1, False),
        ((2, 4, 4, 64), (3, 3, 64, 128), (1, 1), SAME, 1, False),
    ]


def test_vgg_face_convolutions_are_counted_once_per_shape():
    assert _summary(convs.convolutions("vgg_face", 32, 1)) == [
        ((1, 32, 32, 3), (3, 3, 3, 64), (1, 1), SAME, 1, True),
        ((1, 32, 32, 64), (3, 3, 64, 64), (1, 1), SAME, 1, False),
        ((1, 16, 16, 64), (3, 3, 64, 128), (1, 1), SAME, 1, False),
        ((1, 16, 16, 128), (3, 3, 128, 128), (1, 1), SAME, 1, False),
        ((1, 8, 8, 128), (3, 3, 128, 256), (1, 1), SAME, 1, False),
        ((1, 8, 8, 256), (3, 3, 256, 256), (1, 1), SAME, 2, False),
        ((1, 4, 4, 256), (3, 3, 256, 512), (1, 1), SAME, 1, False),
        ((1, 4, 4, 512), (3, 3, 512, 512), (1, 1), SAME, 2, False),
        ((1, 2, 2, 512), (3, 3, 512, 512), (1, 1), SAME, 3, False),
    ]


def test_resnet50_has_its_53_convolutions():
    found = convs.convolutions("resnet50", 64, 1)
    assert sum(c["count"] for c in found) == 53
    assert _summary(found)[0] == ((1, 64, 64, 3), (7, 7, 3, 64), (2, 2), ((3, 3), (3, 3)), 1,
                                  True)
    assert sum(c["count"] for c in found if c["strides"] == (2, 2)) == 7  # stem, 3 + 3 in stages


def _conv(input_shape, kernel, strides=(1, 1), padding=SAME, first=False):
    return {"input": input_shape, "kernel": kernel, "strides": strides, "padding": padding,
            "first": first}


@pytest.mark.parametrize("conv", [
    _conv((2, 9, 9, 3), (3, 3, 3, 5), first=True),
    _conv((2, 8, 8, 4), (3, 3, 4, 6), strides=(2, 2)),
    _conv((1, 6, 6, 4), (1, 1, 4, 3), padding=((0, 0),) * 2),
])
def test_both_sides_compute_the_same_convolutions(conv):
    jops, arrays = convs.jax_ops(conv, np.random.default_rng(0))
    tops = convs.torch_ops(conv, *arrays)
    assert set(jops) == set(tops) == ({"fwd", "dW"} if conv["first"] else {"fwd", "dx", "dW"})
    for which, (fn, args) in jops.items():
        ours = np.asarray(fn(*args))
        theirs = convs.torch_result(which, tops[which]())
        assert ours.shape == theirs.shape, which
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4, err_msg=which)
        assert np.abs(ours).max() > 0.1, which  # not trivially equal


def test_asymmetric_padding_is_refused():
    conv = _conv((1, 8, 8, 2), (3, 3, 2, 2), strides=(2, 2), padding=((0, 1), (0, 1)))
    _, arrays = convs.jax_ops(conv, np.random.default_rng(0))
    with pytest.raises(ValueError, match="asymmetric padding"):
        convs.torch_ops(conv, *arrays)


def test_the_script_prints_a_row_per_convolution_and_the_total():
    out = subprocess.run(
        [sys.executable, "benchmarks/compare_convolutions.py", "--cases", "small_cnn",
         "--repeats", "1", "--calls", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| small_cnn |")]
    assert [row.split(" | ")[1] for row in rows] == [
        "64x64x64x3 * 3x3x3x16", "64x32x32x16 * 3x3x16x32", "64x16x16x32 * 3x3x32x64",
        "64x8x8x64 * 3x3x64x128", "every convolution, x count"]
    first = rows[0].split(" | ")
    assert first[5:7] == ["-", "-"]  # no input gradient for the image
