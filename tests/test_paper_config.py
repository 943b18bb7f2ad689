"""configs/paper_vgg.py: the paper's recipe, and that it trains (slow)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, load_config
from fbnet_jax import config_checks, train


def test_the_paper_recipe():
    config = load_config("paper_vgg.py", "synthetic")
    assert config_checks.validate(config, num_devices=1) == []
    assert (config.model.backbone, config.data.image_size) == ("vgg_face", 112)
    assert (config.model.backbones.vgg_face.fc, config.model.backbones.vgg_face.dropout) == (
        4096, 0.5)
    assert dict(config.loss.weights) == {"expression": 1.0, "au": 1.0, "va": 1.0,
                                         "co_annotation": 1.0, "distribution_matching": 1.0}
    assert config.loss.relatedness == "du2014"
    assert not config.loss.distribution_matching.stop_gradient
    assert train.coupling_for(config) is not None
    # Every synthetic source renders at the model's input size, and all six are mixed.
    sources = config.data.sources
    assert len(sources) == 6 and all(sources[n].synthetic.image_size == 112 for n in sources)


def test_the_real_data_variant_says_what_is_missing():
    with pytest.raises(ValueError, match="use 'synthetic'"):
        load_config("paper_vgg.py", "")


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["--config", "paper_vgg:synthetic", "--config.data.global_batch_size=4"],
    ["--config", "synthetic:tiny", "--config.model.backbone=resnet50",
     "--config.data.image_size=64"],
], ids=["paper_vgg", "resnet50"])
def test_it_trains(tmp_path, args):
    small_splits = [f"--config.data.sources.{name}.{split}_size=4"
                    for name in ("affectnet_like", "rafdb_like", "affwild2_like", "emotionet_like",
                                 "disfa_like", "bp4d_like")
                    for split in ("test", "validation")]
    if "synthetic:tiny" in args:
        small_splits = [a for a in small_splits
                        if not any(s in a for s in ("emotionet", "disfa", "bp4d"))]
    result = subprocess.run(
        [sys.executable, "-m", "fbnet_jax.main", "train", *args, "--workdir", str(tmp_path),
         "--config.train.num_steps=2", "--config.train.eval_every=0",
         "--config.data.eval_batch_size=4", *small_splits],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=1200, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 2
