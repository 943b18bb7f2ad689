"""Config validation before a run starts, and restart checks against a checkpoint's config."""

import numpy as np
import pytest

from conftest import load_config
from data_pipelines import pipeline
from fbnet_jax.runtime import checkpointing
from fbnet_jax.train import checks as config_checks
from fbnet_jax.config import restart
from fbnet_jax.eval import metrics
from fbnet_jax.core.errors import ConfigError


def test_the_shipped_configs_are_valid(tiny_config):
    assert config_checks.validate(load_config("synthetic.py"), num_devices=8) == []
    assert config_checks.validate(tiny_config, num_devices=8) == []


# (field, value, the exact problem line)
BAD_FIELDS = [
    ("evals.test.split", "tset", "evals.test.split: 'tset' is not a split of affectnet_like, "
                                 "affwild2_like, rafdb_like (splits of every source it reads: "
                                 "test, validation)"),
    ("optimizer.learning_rate", -1e-3, "optimizer.learning_rate: must be > 0, got -0.001"),
    ("train.checkpoint_every", 0, "train.checkpoint_every: must be >= 1, got 0"),
    ("train.log_every", 0, "train.log_every: must be >= 1, got 0"),
    ("evals.validation.every", -1, "evals.validation.every: must be an integer >= 0, got -1"),
    ("train.num_steps", 0, "train.num_steps: must be >= 1, got 0"),
    ("train.best_mode", "maximum", "train.best_mode: 'maximum' is not one of 'max', 'min'"),
    ("model.backbone", "resnet", "model.backbone: unknown backbone 'resnet'; known: small_cnn, "
                                 "vgg_face, resnet50"),
    ("model.dtype", "float8", "model.dtype: 'float8' is not one of 'float32', 'bfloat16', "
                              "'float16'"),
    ("optimizer.name", "adam", "optimizer.name: 'adam' is not one of 'adamw', 'sgd'"),
    ("optimizer.momentum", 1.0, "optimizer.momentum: must be >= 0 and < 1, got 1.0"),
    ("data.global_batch_size", 12, "data.global_batch_size: 12 does not split evenly over the 8 "
                                   "devices of this machine; use a multiple of 8"),
    ("data.augment.flip", 1.5, "data.augment.flip: must be >= 0 and <= 1, got 1.5"),
    ("data.num_workers", -2, "data.num_workers: must be >= 0, got -2"),
    ("data.device_prefetch", -1, "data.device_prefetch: must be >= 0, got -1"),
    ("seed", -1, "seed: must be >= 0 and < 4294967296, got -1"),
    ("name", "my/run", "name: 'my/run' must be letters, digits, '_', '.' or '-' (it names the "
                       "default work directory)"),
    ("data.sources.rafdb_like.weight", -0.5, "data.sources.rafdb_like.weight: must be finite "
                                             "and >= 0, got -0.5"),
    ("data.sources.rafdb_like.test_size", 0, "data.sources.rafdb_like.test_size: must be >= 1, "
                                             "got 0"),
    ("loss.weights.co_annotation", -1.0, "loss.weights.co_annotation: must be >= 0, got -1.0"),
]


@pytest.mark.parametrize("field, value, problem", BAD_FIELDS, ids=[f for f, _, _ in BAD_FIELDS])
def test_each_bad_field_is_named_with_what_is_allowed(tiny_config, field, value, problem):
    *parents, leaf = field.split(".")
    node = tiny_config
    for key in parents:
        node = node[key]
    node[leaf] = value
    with pytest.raises(ConfigError) as raised:
        config_checks.validate(tiny_config, num_devices=8, num_processes=1)
    assert raised.value.problems == [problem]


def test_coupling_settings_are_checked_only_when_a_coupling_is_on(tiny_config, tmp_path):
    tiny_config.loss.relatedness = str(tmp_path / "missing.json")
    assert config_checks.validate(tiny_config, num_devices=1) == []  # couplings off: unused
    tiny_config.loss.weights.distribution_matching = 1.0
    with pytest.raises(ConfigError) as raised:
        config_checks.validate(tiny_config, num_devices=1)
    (problem,) = raised.value.problems
    assert problem.startswith("loss.relatedness: ") and "missing.json" in problem


def test_co_annotation_targets_are_soft_or_hard(tiny_config):
    tiny_config.loss.co_annotation.au_targets = "sofft"
    assert config_checks.validate(tiny_config, num_devices=1) == []  # couplings off: unused
    tiny_config.loss.weights.co_annotation = 1.0
    with pytest.raises(ConfigError) as raised:
        config_checks.validate(tiny_config, num_devices=1)
    assert raised.value.problems == [
        "loss.co_annotation.au_targets: 'sofft' is not one of 'soft', 'hard'"]


def test_a_misspelt_best_metric_is_refused_with_examples(tiny_config):
    tiny_config.train.best_metric = "validation/expression_acc"
    with pytest.raises(ConfigError) as raised:
        config_checks.validate(tiny_config, num_devices=1)
    (problem,) = raised.value.problems
    assert problem.startswith("train.best_metric: 'validation/expression_acc' is not a metric of "
                              "any evaluator that runs during training (validation); for "
                              "example ")
    assert "validation/expression_accuracy" in problem


def test_every_problem_is_reported_at_once(tiny_config):
    tiny_config.train.num_steps = 0
    tiny_config.model.backbone = "nope"
    tiny_config.optimizer.learning_rate = 0.0
    with pytest.raises(ConfigError) as raised:
        config_checks.validate(tiny_config, num_devices=1)
    assert [p.split(":")[0] for p in raised.value.problems] == [
        "model.backbone", "optimizer.learning_rate", "train.num_steps"]


def test_an_image_size_the_backbone_cannot_take_is_a_config_error(tiny_config):
    tiny_config.model.backbone = "vgg_face"
    tiny_config.data.image_size = 16  # five 2x2 pools leave nothing of 16 px
    with pytest.raises(ConfigError, match=r"model: a vgg_face with these settings cannot take "
                                          r"16x16 images \(data.image_size\)"):
        config_checks.validate(tiny_config, num_devices=1)


def test_tuning_thresholds_on_the_scored_split_is_refused(tiny_config):
    tiny_config.evals.test.au_thresholds_from = "test"
    with pytest.raises(ConfigError, match=r"evals.test.au_thresholds_from: thresholds tuned on "
                                          r"the split being scored \('test'\) would flatter it"):
        config_checks.validate(tiny_config, num_devices=1)


def test_best_metric_without_periodic_evaluation_is_a_warning(tiny_config):
    tiny_config.evals.validation.every = 0
    assert config_checks.validate(tiny_config, num_devices=1) == [
        "train.best_metric is 'validation/expression_accuracy', a metric of validation, which "
        "never runs during training (every = 0): no best checkpoint is kept"]


def test_metric_names_are_exactly_the_keys_of_a_fully_labelled_evaluation(tiny_config):
    names = pipeline.source_names(tiny_config.data)
    rng = np.random.default_rng(0)
    n = 60
    batch = {"expression": rng.integers(0, 7, n), "expression_mask": np.ones(n),
             "au": rng.integers(0, 2, (n, 17)).astype(float), "au_mask": np.ones((n, 17)),
             "va": rng.uniform(-1, 1, (n, 2)), "va_mask": np.ones(n),
             "source": np.arange(n) % len(names), "valid": np.ones(n)}
    outputs = {"expression_logits": rng.normal(size=(n, 7)), "au_logits": rng.normal(size=(n, 17)),
               "va": rng.uniform(-1, 1, (n, 2))}
    real = metrics.evaluate_arrays(outputs, batch, names, prefix="validation")
    assert metrics.metric_names(names, prefix="validation") == tuple(sorted(real))
    assert "validation/rafdb_like/va_mean_ccc" in real


def test_differences_of_nested_configs():
    before = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    after = {"a": {"b": 2, "c": [1, 2]}, "e": 3, "d": "x"}
    assert restart.differences(before, after) == [("a.b", 1, 2), ("e", "<absent>", 3)]
    assert restart.differences(before, before) == []


# --- restarts -------------------------------------------------------------------------------

def test_the_same_config_restarts_silently(tiny_config):
    assert config_checks.check_restart(tiny_config, load_config("synthetic.py", "tiny"),
                                       step=4) == []


def test_bookkeeping_fields_may_change(tiny_config):
    changed = load_config("synthetic.py", "tiny")
    changed.train.log_every = 7
    changed.data.eval_batch_size = 8
    changed.data.device_prefetch = 0
    assert config_checks.check_restart(tiny_config, changed, step=4) == [
        "changed (no effect on the training): data.device_prefetch: 2 -> 0",
        "changed (no effect on the training): data.eval_batch_size: 32 -> 8",
        "changed (no effect on the training): train.log_every: 2 -> 7"]


def test_a_training_change_needs_to_be_allowed(tiny_config):
    changed = load_config("synthetic.py", "tiny")
    changed.optimizer.learning_rate = 0.1
    changed.train.num_steps = 10
    with pytest.raises(ConfigError) as raised:
        config_checks.check_restart(tiny_config, changed, step=4, what="the run in x")
    assert str(raised.value).startswith(
        "the config differs from the one the run in x was trained with (its checkpoint of step "
        "4):\n  - optimizer.learning_rate: 0.002 -> 0.1\n  - train.num_steps: 4 -> 10\n  - these "
        "change the training")
    assert "--allow_config_change" in str(raised.value)
    assert config_checks.check_restart(tiny_config, changed, step=4, allow_changes=True) == [
        "changed (--allow_config_change): optimizer.learning_rate: 0.002 -> 0.1",
        "changed (--allow_config_change): train.num_steps: 4 -> 10"]


@pytest.mark.parametrize("field, value, culprit, leaf", [
    ("data.image_size", 48, "data.image_size: 32 -> 48",
     "params/backbone/Dense_0/kernel: float32[1024, 32] -> float32[2304, 32]"),
    ("model.backbones.small_cnn.features", 64, "model.backbones.small_cnn.features: 32 -> 64",
     "params/au_head/kernel: float32[32, 17] -> float32[64, 17]"),
])
def test_a_shape_change_is_refused_even_when_changes_are_allowed(tiny_config, field, value,
                                                                 culprit, leaf):
    changed = load_config("synthetic.py", "tiny")
    *parents, name = field.split(".")
    node = changed
    for key in parents:
        node = node[key]
    node[name] = value
    changed.optimizer.learning_rate = 0.1  # a second change, which does not change shapes
    with pytest.raises(ConfigError) as raised:
        config_checks.check_restart(tiny_config, changed, step=4, allow_changes=True)
    (problem, advice) = raised.value.problems
    assert problem.startswith("the train state in the checkpoint of step 4 has other shapes than "
                              f"this config's ({leaf}")
    assert problem.endswith(f"changed by {culprit}")  # the learning rate is not blamed
    assert advice.startswith("keep the run's values for these fields")


def test_sources_saved_before_prepared_image_size_and_cache_restart(tiny_config, tmp_path):
    config = tiny_config.copy_and_resolve_references()
    with config.unlocked():
        config.data.sources.faces = pipeline.prepared_source("manifest", str(tmp_path))
    config.data.sources.affectnet_like.cache = True
    saved = restart.as_plain(config)
    del saved["data"]["sources"]["faces"]["prepared_image_size"]
    assert "prepared_image_size" not in saved["data"]["sources"]["affectnet_like"]
    restored = checkpointing.config_from_json(saved)
    assert restored.data.sources.faces.prepared_image_size == 0
    assert "prepared_image_size" not in restored.data.sources.affectnet_like  # synthetic
    assert config_checks.check_restart(restored, config, step=4) == []
    # A synthetic source saved before `cache` rendered every face each time: a free change.
    del saved["data"]["sources"]["affectnet_like"]["cache"]
    restored = checkpointing.config_from_json(saved)
    assert restored.data.sources.affectnet_like.cache is False
    assert config_checks.check_restart(restored, config, step=4) == [
        "changed (no effect on the training): data.sources.affectnet_like.cache: False -> True"]


def test_a_run_saved_before_co_annotation_targets_restarts_with_the_hard_rule(tiny_config):
    # Runs saved before the field trained co-annotation with target 1 weighted by the table.
    saved = restart.as_plain(tiny_config)
    del saved["loss"]["co_annotation"]
    restored = checkpointing.config_from_json(saved)
    assert restored.loss.co_annotation.au_targets == "hard"
    assert config_checks.check_restart(restored, tiny_config, step=4) == []
    changed = tiny_config.copy_and_resolve_references()
    changed.loss.co_annotation.au_targets = "soft"
    with pytest.raises(ConfigError, match=r"loss.co_annotation.au_targets: 'hard' -> 'soft'"):
        config_checks.check_restart(restored, changed, step=4)


def test_how_the_step_runs_may_change_on_a_restart(tiny_config):
    # The data order is a function of the step, and the modes give the same numbers.
    changed = load_config("synthetic.py", "tiny")
    changed.data.num_workers = 2
    changed.parallel.mode = "pmap"
    changed.train.nonfinite = "skip"
    assert config_checks.check_restart(tiny_config, changed, step=4) == [
        "changed (no effect on the training): data.num_workers: 0 -> 2",
        "changed (no effect on the training): parallel.mode: 'jit' -> 'pmap'",
        "changed (no effect on the training): train.nonfinite: 'stop' -> 'skip'"]
    # Microbatches change what BatchNorm normalises by: a change of the training.
    changed.train.grad_accum_steps = 2
    with pytest.raises(ConfigError, match=r"train.grad_accum_steps: 1 -> 2"):
        config_checks.check_restart(tiny_config, changed, step=4)
