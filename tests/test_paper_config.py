"""configs/paper_vgg.py: the paper's recipe, and that it trains (slow)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, load_config
from fbnet_jax.train import checks as config_checks
from fbnet_jax.train import loop as train


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
    # Every synthetic source renders at the model's input size; six are mixed, and the compound
    # one is evaluated only, by the compound evaluators.
    sources = config.data.sources
    assert all(sources[n].synthetic.image_size == 112 for n in sources)
    assert len([n for n in sources if sources[n].weight > 0]) == 6
    assert sources.rafdb_compound_like.weight == 0
    assert [config.evals[n].sources for n in ("compound_zero_shot", "compound_few_shot")] == [
        ("rafdb_compound_like",)] * 2


def test_the_real_data_variant_has_the_papers_datasets_and_asks_for_their_roots():
    config = load_config("paper_vgg.py", "")
    sources = config.data.sources
    assert {n: (sources[n].kind, sources[n].weight) for n in sources} == {
        "affectnet": ("affectnet", 0.16), "rafdb": ("rafdb", 0.06), "expw": ("expw", 0.06),
        "affwild2_expr": ("affwild2", 0.06), "affwild2_au": ("affwild2", 0.10),
        "emotionet": ("emotionet", 0.08), "disfa": ("disfa", 0.06), "bp4d": ("bp4d", 0.06),
        "bp4d_plus": ("bp4d_plus", 0.06), "affwild2_va": ("affwild2", 0.30),
        "rafdb_compound": ("rafdb_compound", 0.0)}
    assert [config.evals[n].sources for n in ("compound_zero_shot", "compound_few_shot")] == [
        ("rafdb_compound",)] * 2
    assert [sources[n].options.task for n in ("affwild2_expr", "affwild2_au", "affwild2_va")] == [
        "expr", "au", "va"]
    assert abs(sum(sources[n].weight for n in sources) - 1.0) < 1e-9
    assert (config.model.backbone, config.data.image_size, config.name) == (
        "vgg_face", 112, "paper_vgg")
    with pytest.raises(config_checks.ConfigError) as error:
        config_checks.validate(config, num_devices=1)
    assert "data.sources.affectnet.root: empty; give the affectnet dataset's folder with " \
           "--config.data.sources.affectnet.root=/path/to/it" in str(error.value)
    # The paper fine-tunes pretrained VGG-FACE: without weights it is refused, in one line.
    (weights_problem,) = [p for p in error.value.problems if p.startswith("model.init_from")]
    assert weights_problem == (
        "model.init_from: this config starts the backbone from pretrained weights: convert the "
        "VGG-Face release (vgg_face_dag.pth) once with `fbnet convert-weights --from "
        "vgg_face_dag.pth --out vggface.npz` and pass --config.model.init_from=vggface.npz (or "
        "--config.model.init_from=none to train from random weights on purpose)")
    config.model.init_from = "none"
    with pytest.raises(config_checks.ConfigError) as error:
        config_checks.validate(config, num_devices=1)
    assert not [p for p in error.value.problems if p.startswith("model.init_from")]
    assert load_config("paper_vgg.py", "synthetic").model.init_from == ""


def test_the_real_data_variant_takes_the_datasets_you_hold(tmp_path):
    config = load_config("paper_vgg.py", "rafdb, disfa")
    assert list(config.data.sources) == ["disfa", "rafdb"]
    assert list(config.evals) == ["test", "validation"]   # no compound set: no compound evals
    with pytest.raises(ValueError, match="unknown variant 'rafdb,fer' of configs/paper_vgg.py"):
        load_config("paper_vgg.py", "rafdb,fer")


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
    else:
        small_splits.append("--config.data.sources.rafdb_compound_like.test_size=22")
    result = subprocess.run(
        [sys.executable, "-m", "fbnet_jax", "train", *args, "--workdir", str(tmp_path),
         "--config.train.num_steps=2", "--config.evals.validation.every=0",
         "--config.data.eval_batch_size=4", "--config.data.render_cache_dir=", *small_splits],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=1200, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 2
