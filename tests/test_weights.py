"""Pretrained weights: PyTorch state_dicts -> backbone variables, files, `model.init_from`.

Most tests build torch-style state_dicts in numpy (names and shapes as torch writes them), so
torch is not needed. The parity tests (`pytest.importorskip("torch")`) run small torch modules
that reproduce each layout's keys and forward pass against the converted flax backbone.
"""

import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import resnet50_shapes
from fbnet_jax.train import checks as config_checks
from fbnet_jax.runtime import parallel
from fbnet_jax.runtime import state as state_lib
from fbnet_jax.core.errors import ConfigError, UserError
from fbnet_jax.model import FaceBehaviorNet, backbones, state_dicts, weight_files, weights

# VGG-16's 13 convolutions: (name, in channels, out channels), and torchvision's index of each.
VGG_CONVS = [("conv1_1", 3, 64), ("conv1_2", 64, 64), ("conv2_1", 64, 128),
             ("conv2_2", 128, 128), ("conv3_1", 128, 256), ("conv3_2", 256, 256),
             ("conv3_3", 256, 256), ("conv4_1", 256, 512), ("conv4_2", 512, 512),
             ("conv4_3", 512, 512), ("conv5_1", 512, 512), ("conv5_2", 512, 512),
             ("conv5_3", 512, 512)]
TORCHVISION_FEATURES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
FC = 8  # fc6/fc7 width in these tests (4096 in the real networks)


def _random(shape, rng, scale=None):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    scale = np.sqrt(2.0 / fan_in) if scale is None else scale
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def vgg_shapes(layout: str, grid: int, fc: int = FC, classes: int = 5) -> dict[str, tuple]:
    """{key: torch shape} of a vgg_face_torch or torchvision_vgg16 state_dict."""
    names = ([c[0] for c in VGG_CONVS] + ["fc6", "fc7", "fc8"] if layout == "vgg_face_torch" else
             [f"features.{i}" for i in TORCHVISION_FEATURES]
             + ["classifier.0", "classifier.3", "classifier.6"])
    sizes = [(o, i, 3, 3) for _, i, o in VGG_CONVS] + [(fc, 512 * grid * grid), (fc, fc),
                                                       (classes, fc)]
    shapes = {}
    for name, size in zip(names, sizes):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = size, size[:1]
    return shapes


def numpy_state_dict(shapes, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = np.array(7, np.int64)
        elif key.endswith("running_var"):
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif len(shape) == 1:
            out[key] = _random(shape, rng, scale=0.1)
        else:
            out[key] = _random(shape, rng)
    return out


@pytest.fixture(scope="module")
def vgg_face_dict():
    return numpy_state_dict(vgg_shapes("vgg_face_torch", grid=2))


# --- conversion, without torch -------------------------------------------------------------

def test_vgg_face_torch_maps_every_key(vgg_face_dict):
    sd = vgg_face_dict
    out = state_dicts.convert_state_dict(sd, fold_normalization=False)
    p = out["params"]
    assert out["batch_stats"] == {}
    assert sorted(p) == sorted([c[0] for c in VGG_CONVS] + ["fc6", "fc7"])
    for name, _, _ in VGG_CONVS:
        np.testing.assert_array_equal(p[name]["kernel"], sd[f"{name}.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(p[name]["bias"], sd[f"{name}.bias"])
    np.testing.assert_array_equal(p["fc7"]["kernel"], sd["fc7.weight"].T)
    # fc6 row order: torch flattens (C, H, W), flax (H, W, C).
    w6 = sd["fc6.weight"]
    assert p["fc6"]["kernel"].shape == (2 * 2 * 512, FC)
    for c, h, w, o in [(0, 0, 0, 0), (5, 0, 1, 3), (511, 1, 0, 7), (300, 1, 1, 2)]:
        assert p["fc6"]["kernel"][h * 2 * 512 + w * 512 + c, o] == w6[o, c * 4 + h * 2 + w]
    fmap = np.random.default_rng(1).standard_normal((2, 2, 512)).astype(np.float32)
    np.testing.assert_allclose(fmap.reshape(-1) @ p["fc6"]["kernel"],
                               fmap.transpose(2, 0, 1).reshape(-1) @ w6.T, rtol=1e-5, atol=1e-5)


def test_torchvision_vgg16_keys():
    sd = numpy_state_dict(vgg_shapes("torchvision_vgg16", grid=7))
    assert state_dicts.detect_layout(sd) == "torchvision_vgg16"
    p = state_dicts.convert_state_dict(sd, fold_normalization=False)["params"]
    np.testing.assert_array_equal(p["conv5_3"]["kernel"],
                                  sd["features.28.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["conv2_1"]["bias"], sd["features.5.bias"])
    np.testing.assert_array_equal(p["fc7"]["kernel"], sd["classifier.3.weight"].T)
    assert p["fc6"]["kernel"].shape == (7 * 7 * 512, FC)


def test_torchvision_resnet50_keys():
    sd = numpy_state_dict(resnet50_shapes())
    assert state_dicts.detect_layout(sd) == "torchvision_resnet50"
    out = state_dicts.convert_state_dict(sd, fold_normalization=False)
    p, s = out["params"], out["batch_stats"]
    np.testing.assert_array_equal(p["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["layer2_0"]["downsample_0"]["kernel"],
                                  sd["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["layer3_5"]["bn2"]["scale"], sd["layer3.5.bn2.weight"])
    np.testing.assert_array_equal(p["layer3_5"]["bn2"]["bias"], sd["layer3.5.bn2.bias"])
    np.testing.assert_array_equal(s["layer4_0"]["downsample_1"]["mean"],
                                  sd["layer4.0.downsample.1.running_mean"])
    np.testing.assert_array_equal(s["bn1"]["var"], sd["bn1.running_var"])
    used = sum(v.size for v in jax.tree.leaves(p))
    assert used == 23_508_032  # every parameter of ResNet50 (docs/design.md)
    module_prefixed = {f"module.{k}": v for k, v in sd.items()}  # nn.DataParallel's keys
    assert state_dicts.detect_layout(module_prefixed) == "torchvision_resnet50"


def test_missing_unexpected_and_misshapen_keys_are_named(vgg_face_dict):
    sd = dict(vgg_face_dict)
    del sd["conv3_2.bias"]
    sd["conv6_1.weight"] = np.zeros((1,), np.float32)
    sd["conv2_1.weight"] = np.zeros((128, 63, 3, 3), np.float32)
    with pytest.raises(UserError) as e:
        state_dicts.convert_state_dict(sd, source="face.pth")
    message = str(e.value)
    assert message.startswith("face.pth: not a vgg_face_torch state_dict: ")
    assert ("conv2_1.weight has shape [128, 63, 3, 3], but params/conv2_1/kernel of the "
            "vgg_face backbone needs [128, 64, 3, 3] (as torch stores it)") in message
    assert "missing keys: conv3_2.bias" in message
    assert message.endswith("unexpected keys (not part of vgg_face_torch, which drops only "
                            "fc8.weight, fc8.bias): conv6_1.weight")


def test_layout_detection_errors():
    with pytest.raises(UserError, match="cannot tell its layout from its keys .*known layouts "
                                        r"\(and a key each has\): vgg_face_torch"):
        state_dicts.detect_layout({"encoder.weight": 0}, "x.pth")
    with pytest.raises(UserError, match="vgg16_bn"):
        state_dicts.detect_layout({"features.0.weight": 0, "features.1.running_mean": 0})
    with pytest.raises(UserError, match="unknown layout 'vgg19'"):
        state_dicts.convert_state_dict({}, "vgg19")
    bad = numpy_state_dict(vgg_shapes("vgg_face_torch", grid=2))
    bad["fc6.weight"] = np.zeros((FC, 1000), np.float32)
    with pytest.raises(UserError, match="fc6.weight takes 1000 inputs, not 512 x g x g"):
        state_dicts.convert_state_dict(bad)


def _conv(x, kernel, bias=None):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return np.asarray(y if bias is None else y + bias)


@pytest.mark.parametrize("layout", ["vgg_face_torch", "torchvision_resnet50"])
def test_folded_normalization_takes_minus_one_to_one(layout, vgg_face_dict):
    sd = vgg_face_dict if layout == "vgg_face_torch" else numpy_state_dict(resnet50_shapes())
    raw = state_dicts.convert_state_dict(sd, layout, fold_normalization=False)
    folded = state_dicts.convert_state_dict(sd, layout)
    spec = state_dicts.LAYOUTS[layout]
    x = np.random.default_rng(2).uniform(-1, 1, (1, 12, 12, 3)).astype(np.float32)
    pixels = (x + 1) / 2 * spec.pixel_max
    normalized = (pixels - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    conv = spec.first_conv
    if spec.first_bn is None:  # VGG: conv with bias
        want = _conv(normalized, raw["params"][conv]["kernel"], raw["params"][conv]["bias"])
        got = _conv(x, folded["params"][conv]["kernel"], folded["params"][conv]["bias"])
    else:  # ResNet: no conv bias; BatchNorm subtracts its running mean next
        want = _conv(normalized, raw["params"][conv]["kernel"]) \
            - raw["batch_stats"][spec.first_bn]["mean"]
        got = _conv(x, folded["params"][conv]["kernel"]) \
            - folded["batch_stats"][spec.first_bn]["mean"]
    border = raw["params"][conv]["kernel"].shape[0] // 2
    inner = (slice(None), slice(border, -border), slice(border, -border))
    scale = np.abs(want).max()
    np.testing.assert_allclose(got[inner], want[inner], atol=1e-5 * scale, rtol=1e-5)
    assert np.abs(got - want).max() > 1e-3 * scale  # the border differs (documented)


def test_adaptive_pool_resampling_of_fc6_is_a_pool_then_fc6():
    rng = np.random.default_rng(3)
    channels, grid_from, grid_to, out = 4, 7, 3, 5
    kernel = rng.standard_normal((grid_from * grid_from * channels, out)).astype(np.float32)
    fmap = rng.standard_normal((grid_to, grid_to, channels)).astype(np.float32)
    pooled = np.zeros((grid_from, grid_from, channels), np.float32)
    for i in range(grid_from):  # torch's AdaptiveAvgPool2d bins: [floor(i*n/m), ceil((i+1)*n/m))
        for j in range(grid_from):
            r0, r1 = (i * grid_to) // grid_from, -(-((i + 1) * grid_to) // grid_from)
            c0, c1 = (j * grid_to) // grid_from, -(-((j + 1) * grid_to) // grid_from)
            pooled[i, j] = fmap[r0:r1, c0:c1].mean(axis=(0, 1))
    resampled = weights.resample_fc6(kernel, grid_from, grid_to)
    np.testing.assert_allclose(fmap.reshape(-1) @ resampled, pooled.reshape(-1) @ kernel,
                               rtol=1e-5, atol=1e-5)


# --- files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_converted_file_round_trip(tmp_path, suffix, caplog):
    sd = numpy_state_dict(resnet50_shapes())
    raw = tmp_path / f"resnet{suffix}"  # a raw state_dict stored as numpy (keys with dots)
    if suffix == ".npz":
        np.savez(raw, **sd)
    else:
        from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
        st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(raw))
    out = tmp_path / f"converted{suffix}"
    with caplog.at_level(logging.INFO, logger="fbnet_jax.model.weights"):
        assert weights.run_command(str(raw), str(out)) == 0
    assert "converted" in caplog.text and "--config.model.init_from=" in caplog.text
    assert "dropped: bn1.num_batches_tracked" in caplog.text
    variables, meta = weight_files.load_converted(out)
    assert meta == {"format": 1, "backbone": "resnet50", "layout": "torchvision_resnet50",
                    "source": raw.name, "input": "[-1, 1]", "fc6_grid": None,
                    "fc6_adaptive_pool": False}
    want = state_dicts.convert_state_dict(sd)
    jax.tree.map(np.testing.assert_array_equal, variables, want)
    # The raw file converts on the fly to the same variables.
    on_the_fly, _ = weight_files.load_converted(raw)
    jax.tree.map(np.testing.assert_array_equal, on_the_fly, want)


def test_run_command_errors(tmp_path, vgg_face_dict):
    src = tmp_path / "face.npz"
    np.savez(src, **vgg_face_dict)
    with pytest.raises(UserError, match=r"--out .*x\.pth: must end in \.npz or \.safetensors"):
        weights.run_command(str(src), str(tmp_path / "x.pth"))
    with pytest.raises(UserError, match="vgg_face_torch weights are for the vgg_face backbone, "
                                        "not resnet50"):
        weights.run_command(str(src), str(tmp_path / "x.npz"), backbone="resnet50")
    with pytest.raises(UserError, match="--layout 'vgg': unknown"):
        weights.run_command(str(src), str(tmp_path / "x.npz"), layout="vgg")
    with pytest.raises(UserError, match=r"not a torchvision_vgg16 state_dict \(its keys look "
                                        r"like vgg_face_torch\): missing keys: classifier.0.bias"):
        weights.run_command(str(src), str(tmp_path / "x.npz"), layout="torchvision_vgg16")
    weights.run_command(str(src), str(tmp_path / "x.npz"))
    with pytest.raises(UserError, match="already converted"):
        weights.run_command(str(tmp_path / "x.npz"), str(tmp_path / "y.npz"))
    with pytest.raises(UserError, match="no such file"):
        weight_files.read_file(tmp_path / "absent.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="broken.npz: not a readable .npz file"):
        weight_files.read_file(tmp_path / "broken.npz")


def test_torch_file_without_torch_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "face.pth"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(UserError) as e:
        weight_files.read_file(path)
    assert "\n" not in str(e.value)
    assert "reading a PyTorch file needs torch: pip install 'fbnet_jax[torch]'" in str(e.value)


# --- model.init_from -----------------------------------------------------------------------

def _vgg_config(tiny_config, init_from, image_size):
    config = tiny_config
    config.model.backbone = "vgg_face"
    config.model.backbones.vgg_face.fc = FC
    config.model.init_from = str(init_from)
    config.data.image_size = image_size
    return config


@pytest.fixture(scope="module")
def converted_vgg(tmp_path_factory, vgg_face_dict):
    path = tmp_path_factory.mktemp("weights") / "vgg_face.npz"
    src = path.with_name("vgg_face_raw.npz")
    np.savez(src, **vgg_face_dict)
    weights.run_command(str(src), str(path))
    return path


def test_create_state_loads_the_backbone_and_keeps_heads_fresh(tiny_config, converted_vgg,
                                                               tmp_path, caplog):
    config = _vgg_config(tiny_config, converted_vgg, 64)
    mesh = parallel.create_mesh()
    with caplog.at_level(logging.INFO, logger="fbnet_jax.model.weights"):
        _, _, _, state = state_lib.create_state(config, mesh)
    assert ("loaded all 30 params and 0 batch_stats leaves of the backbone (conv1_1, conv1_2, "
            "conv2_1") in caplog.text
    assert "fc6, fc7); heads fresh: au_head, expression_head, va_head" in caplog.text
    variables, _ = weight_files.load_converted(converted_vgg)
    jax.tree.map(np.testing.assert_array_equal, state.params["backbone"], variables["params"])
    # init_from=False (a restart, which restores a checkpoint next) does not read the file.
    config.model.init_from = str(tmp_path / "absent.npz")
    _, _, _, fresh = state_lib.create_state(config, mesh, init_from=False)
    for head in ("expression_head", "au_head", "va_head"):  # heads as without init_from
        jax.tree.map(np.testing.assert_array_equal, state.params[head], fresh.params[head])
    assert not np.array_equal(fresh.params["backbone"]["conv1_1"]["kernel"],
                              state.params["backbone"]["conv1_1"]["kernel"])
    _, _, _, abstract = state_lib.create_state(config, mesh, abstract=True)  # neither
    assert abstract.params["backbone"]["fc6"]["kernel"].shape == (2048, FC)
    with pytest.raises(UserError, match="absent.npz: no such file"):
        state_lib.create_state(config, mesh)


def test_fc6_grid_mismatch(tiny_config, converted_vgg, tmp_path):
    model = state_lib.model_for(_vgg_config(tiny_config, converted_vgg, 32))
    with pytest.raises(UserError) as e:
        weights.load_init_from(converted_vgg, model, 32, "vgg_face")
    assert ("its fc6 reads a 2x2x512 feature map (64 px images), but data.image_size=32 gives "
            "1x1x512; set data.image_size to 64, or convert with `fbnet convert-weights "
            "--fc6_adaptive_pool`") in str(e.value)
    pooled = tmp_path / "pooled.npz"
    variables, meta = weight_files.load_converted(converted_vgg)
    weight_files.save_converted(variables, dict(meta, fc6_adaptive_pool=True), pooled)
    fitted = weights.load_init_from(pooled, model, 32, "vgg_face")
    # A 1x1 map pooled adaptively to 2x2 is copied into all four cells: fc6 sums their rows.
    k = variables["params"]["fc6"]["kernel"].reshape(4, 512, FC).sum(axis=0)
    np.testing.assert_allclose(fitted["params"]["fc6"]["kernel"], k, rtol=1e-6, atol=1e-6)


def test_init_from_other_backbone_or_width(tiny_config, converted_vgg):
    model = state_lib.model_for(_vgg_config(tiny_config, converted_vgg, 64))
    with pytest.raises(UserError, match="holds vgg_face weights .*but model.backbone is resnet50"):
        weights.load_init_from(converted_vgg, model, 64, "resnet50")
    tiny_config.model.backbones.vgg_face.fc = 16
    wider = state_lib.model_for(tiny_config)
    with pytest.raises(UserError, match=r"params/fc6/bias has shape \[8\], but this model's "
                                        r"needs \[16\] \(see model.backbones.vgg_face\)"):
        weights.load_init_from(converted_vgg, wider, 64, "vgg_face")


real_find_spec = weights.importlib.util.find_spec


def test_config_checks_init_from(tiny_config, tmp_path, converted_vgg, monkeypatch):
    config = _vgg_config(tiny_config, converted_vgg, 64)
    config_checks.validate(config, num_devices=1, num_processes=1)  # valid

    def problems():
        with pytest.raises(ConfigError) as e:
            config_checks.validate(config, num_devices=1, num_processes=1)
        return [p for p in e.value.problems if p.startswith("model.init_from")]

    config.model.init_from = str(tmp_path / "absent.npz")
    assert problems() == [f"model.init_from: {tmp_path / 'absent.npz'}: no such file"]
    config.model.init_from = str(tmp_path / "w.h5")
    assert problems() == [f"model.init_from: {tmp_path / 'w.h5'}: unknown weights file type "
                          f"'.h5'; known: .pth, .pt, .npz, .safetensors"]
    torch_file = tmp_path / "w.pth"
    torch_file.write_bytes(b"")
    config.model.init_from = str(torch_file)
    monkeypatch.setattr(weights.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    assert "needs torch: pip install 'fbnet_jax[torch]'" in problems()[0]
    monkeypatch.undo()
    config.model.init_from = str(converted_vgg)
    config.model.backbone = "small_cnn"
    assert problems() == [f"model.init_from: {converted_vgg}: the small_cnn backbone has no "
                          f"pretrained weights to import; use init_from with resnet50 or vgg_face"]


# --- parity with torch ---------------------------------------------------------------------

def _torch_vgg(torch, naming: str, pool_to: int | None):
    """A VGG-16 in torch: `vgg_face_dag`'s attribute names, or torchvision's Sequentials."""
    nn = torch.nn

    class VGG(nn.Module):
        def __init__(self):
            super().__init__()
            layers, channels = [], 3
            for count, width in backbones.VGG16_STAGES:
                for _ in range(count):
                    layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                    channels = width
                layers.append(nn.MaxPool2d(2, 2))
            grid = pool_to or 2
            classifier = [nn.Linear(512 * grid * grid, FC), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(FC, FC), nn.ReLU(), nn.Dropout(0.5), nn.Linear(FC, 5)]
            if naming == "torchvision":
                self.features = nn.Sequential(*layers)
                self.avgpool = nn.AdaptiveAvgPool2d((pool_to, pool_to))
                self.classifier = nn.Sequential(*classifier)
            else:
                convs = [m for m in layers if isinstance(m, nn.Conv2d)]
                for (name, _, _), conv in zip(VGG_CONVS, convs):
                    setattr(self, name, conv)
                self.fc6, self.fc7, self.fc8 = classifier[0], classifier[3], classifier[6]
                self.layers = layers

        def forward(self, x):  # features: fc7 after its ReLU (the backbone's output)
            if naming == "torchvision":
                x = self.avgpool(self.features(x)).flatten(1)
                return self.classifier[:5](x)
            for layer in self.layers:
                x = layer(x)
            x = x.view(x.size(0), -1)
            return torch.relu(self.fc7(torch.relu(self.fc6(x))))

    return VGG()


def _torch_resnet50(torch):
    """torchvision's ResNet-50 (v1.5), written out: same module names, same forward."""
    nn = torch.nn

    class Bottleneck(nn.Module):
        def __init__(self, inp, width, stride, downsample):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(inp, width, 1, bias=False), nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(4 * width)
            self.downsample = nn.Sequential(nn.Conv2d(inp, 4 * width, 1, stride, bias=False),
                                            nn.BatchNorm2d(4 * width)) if downsample else None

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            inp = 64
            for layer, (blocks, width) in enumerate(backbones.RESNET50_STAGES, start=1):
                stride = 1 if layer == 1 else 2
                modules = []
                for b in range(blocks):
                    modules.append(Bottleneck(inp, width, stride if b == 0 else 1, b == 0))
                    inp = 4 * width
                setattr(self, f"layer{layer}", nn.Sequential(*modules))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(2048, 5)

        def forward(self, x):  # features: the pooled 2048 (before fc)
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            for layer in range(1, 5):
                x = getattr(self, f"layer{layer}")(x)
            return self.avgpool(x).flatten(1)

    return ResNet50()


def _randomize(torch, module, seed):
    """He-normal weights, small biases, non-trivial BatchNorm statistics (all are imported)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("weight") and tensor.ndim == 1:  # BatchNorm scale
                tensor.uniform_(0.3, 0.7)  # keeps ResNet-50's residual sums O(1)
            elif tensor.ndim == 1:
                tensor.normal_(0, 0.1)
            else:
                tensor.normal_(0, float(np.sqrt(2.0 / tensor[0].numel())))
    return module.eval()


def _parity(torch, module, backbone, kwargs, size, meta=None):
    x = np.random.default_rng(4).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    converted = state_dicts.convert_state_dict(module.state_dict(), fold_normalization=False)
    model = FaceBehaviorNet(backbone=backbone, backbone_kwargs=kwargs, num_aus=3)
    # Shapes only (a real init of a VGG or ResNet-50 takes long on CPU); heads are zeros.
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.asarray(x)))
    if meta is not None:  # fit fc6 to this image size as model.init_from does
        converted = weights.fit_to_model(converted, meta, {"params": shapes["params"]["backbone"],
                                                           "batch_stats": {}},
                                         backbone=backbone, image_size=size, source="test")
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    variables["params"]["backbone"] = converted["params"]
    if converted["batch_stats"]:
        variables["batch_stats"]["backbone"] = converted["batch_stats"]
    features = jax.jit(lambda v, x: model.apply(v, x, train=False)["features"])
    got = np.asarray(features(variables, x))
    assert got.shape == want.shape and want.std() > 0.1  # features that are not ~0
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_parity_vgg_face_torch():
    torch = pytest.importorskip("torch")
    module = _randomize(torch, _torch_vgg(torch, "vgg_face_dag", None), 0)
    assert sorted(module.state_dict()) == sorted(vgg_shapes("vgg_face_torch", grid=2))
    _parity(torch, module, "vgg_face", dict(fc=FC), 64)  # fc6 reads a 2x2 map


@pytest.mark.parametrize("pool_to", [2, 7])
def test_parity_torchvision_vgg16(pool_to):
    torch = pytest.importorskip("torch")
    module = _randomize(torch, _torch_vgg(torch, "torchvision", pool_to), 1)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == vgg_shapes("torchvision_vgg16", grid=pool_to)
    # pool_to=7: torchvision's avgpool turns the 2x2 map of 64 px into 7x7; fc6 folds it in.
    meta = dict(backbone="vgg_face", layout="torchvision_vgg16", fc6_grid=pool_to,
                fc6_adaptive_pool=True)
    _parity(torch, module, "vgg_face", dict(fc=FC), 64, meta)


def test_parity_torchvision_resnet50():
    torch = pytest.importorskip("torch")
    module = _randomize(torch, _torch_resnet50(torch), 2)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == resnet50_shapes()
    _parity(torch, module, "resnet50", {}, 64)


def test_pth_file_converts_like_the_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    module = _randomize(torch, _torch_vgg(torch, "vgg_face_dag", None), 3)
    path = tmp_path / "vgg_face.pth"
    torch.save({"state_dict": module.state_dict(), "epoch": 3}, path)
    out = tmp_path / "vgg_face.safetensors"
    assert weights.run_command(str(path), str(out), backbone="vgg_face") == 0
    variables, meta = weight_files.load_converted(out)
    assert meta["layout"] == "vgg_face_torch" and meta["fc6_grid"] == 2
    jax.tree.map(np.testing.assert_array_equal, variables,
                 state_dicts.convert_state_dict(module.state_dict()))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a module, not a state_dict
    with pytest.raises(UserError, match="module.pth: not a PyTorch state_dict that loads with "
                                        "weights_only=True"):
        weight_files.read_file(tmp_path / "module.pth")
