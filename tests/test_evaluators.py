"""The evaluators of a config (fbnet_jax/eval/evaluators/) and their runs (eval/evaluate.py)."""

import copy
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from conftest import REPO, train_tiny_run
from data_pipelines import pipeline
from fbnet_jax.runtime import checkpointing
from fbnet_jax.eval import compound, evaluate, evaluators, metrics
from fbnet_jax.train import checks as config_checks
from fbnet_jax.core import taxonomy

AUS = (1, 2)


def _tasks_evaluator(**options):
    return evaluators.Evaluator(name="t", kind="tasks", split="test", sources=("a",), every=0,
                                final=True, options={"au_thresholds_from": "", **options})


def _fixed_split():
    """Outputs and labels of 4 rows of source 0 ("a"), hand-made so every metric is known."""
    expression_logits = np.full((4, 7), -5.0)
    expression_logits[np.arange(4), [0, 1, 0, 3]] = 5.0     # true classes 0, 1, 2, 3
    au_predicted = np.array([[1, 0], [0, 1], [0, 0], [1, 1]])
    va = np.array([[0.5, -0.5], [-0.5, 0.5], [0.2, 0.1], [-0.2, -0.1]])
    outputs = {"expression_logits": expression_logits,
               "au_logits": np.where(au_predicted == 1, 4.0, -4.0), "va": va}
    labels = {"expression": np.arange(4), "expression_mask": np.ones(4),
              "au": np.array([[1, 0], [1, 1], [0, 0], [0, 1]], float), "au_mask": np.ones((4, 2)),
              "va": va.copy(), "va_mask": np.ones(4), "source": np.zeros(4, int),
              "valid": np.ones(4), "compound": np.zeros(4, int), "compound_mask": np.zeros(4)}
    return outputs, labels


def test_a_tasks_evaluator_on_fixed_outputs_gives_exact_metrics():
    calls = []

    def predict(split, sources, keys):
        calls.append((split, sources, keys))
        outputs, labels = _fixed_split()
        return {k: outputs[k] for k in keys}, labels

    results = _tasks_evaluator()(predict, ["a", "b"], AUS)
    assert calls == [("test", ("a",), evaluators.TASK_OUTPUTS)]
    assert results["test/expression_accuracy"] == results["test/a/expression_accuracy"] == 0.75
    assert results["test/expression_count"] == 4
    # AU1: 1 hit, 1 miss, 1 false alarm (F1 1/2); AU2: 2 hits (F1 1); 6 of 8 pairs right.
    assert results["test/au_f1/AU1"] == 0.5 and results["test/au_f1/AU2"] == 1.0
    assert results["test/au_mean_f1"] == 0.75 and results["test/au_accuracy"] == 0.75
    assert results["test/va_ccc_valence"] == pytest.approx(1.0, abs=1e-12)
    assert results["test/va_mean_ccc"] == pytest.approx(1.0, abs=1e-12)
    assert not any(key.startswith("test/b/") for key in results)  # b has no row: no key
    assert results == metrics.evaluate_arrays(*_fixed_split(), ["a", "b"], aus=AUS, prefix="test")


def test_a_tasks_evaluator_tunes_thresholds_on_its_other_split():
    def predict(split, sources, keys):
        outputs, labels = _fixed_split()
        if split == "validation":  # AU1 is active on every face, with probability >= 0.27
            labels["au"] = np.array([[1, 0], [1, 1], [1, 0], [1, 1]], float)
            outputs["au_logits"][:, 0] = [4.0, -1.0, -1.0, 4.0]
        return outputs, labels

    results = _tasks_evaluator(au_thresholds_from="validation")(predict, ["a"], AUS)
    tuned = metrics.tuned_au_metrics(*predict("validation", (), ()), *predict("test", (), ()),
                                     aus=AUS, prefix="test")
    assert tuned and {k: results[k] for k in tuned} == tuned
    # Every threshold up to 0.27 is best for AU1; the one nearest 0.5 is chosen.
    assert results["test/au_threshold/AU1"] == max(
        t for t in metrics.DEFAULT_THRESHOLD_GRID if t < 1 / (1 + np.exp(1.0)))
    assert set(tuned) == set(metrics.tuned_au_metric_names(AUS, "test"))


def _outputs_for_compound(classes):
    """Outputs whose AU and expression probabilities follow each compound's table row."""
    au = np.clip(taxonomy.compound_relatedness()[classes], 0.01, 0.99)
    expression = np.full((len(classes), 7), 0.02)
    np.put_along_axis(expression, taxonomy.compound_components()[classes], 0.45, axis=1)
    return {"expression_logits": np.log(expression), "au_logits": np.log(au / (1 - au)),
            "features": np.eye(11)[classes] + 0.01 * np.arange(len(classes))[:, None]}


def test_compound_evaluators_on_fixed_outputs():
    classes = np.repeat(np.arange(11), 3)
    labels = {"compound": classes, "compound_mask": np.ones(33), "source": np.full(33, 1),
              "valid": np.ones(33)}

    def predict(split, sources, keys):
        assert (split, sources) == ("test", ("c",))
        outputs = _outputs_for_compound(classes)
        return {k: outputs[k] for k in keys}, labels

    zero = evaluators.Evaluator("z", "compound_zero_shot", "test", ("c",), 0, True, {})
    few = evaluators.Evaluator("f", "compound_few_shot", "test", ("c",), 0, True,
                               {"ks": (1, 2), "draws": 3, "seed": 0})
    results = evaluators.run([zero, few], predict, ["a", "c"], taxonomy.AUS)
    p = "test/c/compound_"
    assert results[p + "zero_shot_accuracy"] == results[p + "zero_shot_uar"] == 1.0
    assert results[p + "few_shot_k1_uar"] == results[p + "few_shot_ncm_k2_uar"] == 1.0
    assert results[p + "few_shot_k2_uar_std"] == 0.0 and results[p + "count"] == 33
    assert set(results) == set(zero.metric_names(taxonomy.AUS)) | set(few.metric_names(
        taxonomy.AUS))


def test_predictions_run_each_split_once_and_return_the_sources_asked_for(monkeypatch):
    config = ml_collections.ConfigDict({"data": {"sources": {"a": {}, "b": {}, "c": {}}}})
    calls = []

    def fake_predict(model, state, config, split, mesh, *, predict_fn, sources, should_stop):
        calls.append((split, tuple(sources), predict_fn))
        rows = np.array([0, 1, 2, 0, 2, 0])   # padding rows carry source 0 and valid 0
        return ({k: np.arange(6) * (len(k) % 7) for k in predict_fn},
                {"source": rows, "valid": np.array([1, 1, 1, 1, 1, 0])})

    monkeypatch.setattr(evaluate, "predict", fake_predict)
    monkeypatch.setattr(evaluate, "make_predict_fn", lambda model, keys: tuple(keys))
    round_evaluators = [
        evaluators.Evaluator("t", "tasks", "test", ("a", "b"), 0, True,
                             {"au_thresholds_from": "validation"}),
        evaluators.Evaluator("f", "compound_few_shot", "test", ("c",), 0, True, {}),
    ]
    predictions = evaluate.Predictions(None, None, config, None, round_evaluators)
    outputs, labels = predictions("test", ("c",), ("features",))
    assert list(labels["source"]) == [2, 2] and list(outputs["features"]) == [2 * 1, 4 * 1]
    outputs, labels = predictions("test", ("a",), ("expression_logits",))
    assert list(labels["source"]) == [0, 0, 0] and list(labels["valid"]) == [1, 1, 0]
    predictions("validation", ("a", "b"), evaluators.TASK_OUTPUTS)
    predictions("validation", ("b",), evaluators.TASK_OUTPUTS)
    # One pass per split, over every source and output the round reads of it.
    assert calls == [("test", ("a", "b", "c"), ("au_logits", "expression_logits", "features",
                                                 "va")),
                     ("validation", ("a", "b"), ("au_logits", "expression_logits", "va"))]


def test_the_shipped_configs_describe_their_evaluations(tiny_config):
    from conftest import load_config
    config = load_config("synthetic.py")
    by_name = {e.name: e for e in evaluators.from_config(config)}
    trained = ("affectnet_like", "affwild2_like", "bp4d_like", "disfa_like", "emotionet_like",
               "rafdb_like")
    assert by_name["validation"] == evaluators.Evaluator(
        "validation", "tasks", "validation", trained, 500, False, {"au_thresholds_from": ""})
    assert by_name["test"] == evaluators.Evaluator(
        "test", "tasks", "test", trained, 0, True, {"au_thresholds_from": "validation"})
    assert by_name["compound_few_shot"] == evaluators.Evaluator(
        "compound_few_shot", "compound_few_shot", "test", ("rafdb_compound_like",), 0, True,
        {"ks": (1, 5, 10), "draws": 5, "seed": 0})
    assert config.data.sources.rafdb_compound_like.weight == 0.0   # never trained on
    assert [e.name for e in evaluators.from_config(tiny_config)] == ["test", "validation"]


def _problems(config, **entries):
    with config.unlocked():
        for name, entry in entries.items():
            config.evals[name] = entry
    return evaluators.problems(config)


def test_mistakes_in_the_evaluators_are_named(tiny_config):
    few = evaluators.compound_few_shot("test", sources=("rafdb_like", "nope"))
    bad_kind = evaluators.tasks("test")
    bad_kind.kind = "task"
    wrong_field = evaluators.compound_zero_shot("test")
    with wrong_field.unlocked():
        wrong_field.ks = (1,)
    ks = evaluators.compound_few_shot("validation", ks=(0, 5), draws=0)
    assert _problems(tiny_config, few=few, bad_kind=bad_kind, wrong_field=wrong_field,
                     ks=ks, again=evaluators.tasks("test", every=-1)) == [
        "evals.again.every: must be an integer >= 0, got -1",
        "evals.bad_kind.kind: 'task' is not one of tasks, compound_zero_shot, compound_few_shot",
        "evals.few.sources: no source named 'nope' in data.sources (affectnet_like, "
        "affwild2_like, rafdb_like)",
        "evals.ks.ks: must be a tuple of integers >= 1, got (0, 5)",
        "evals.ks.draws: must be an integer >= 1, got 0",
        "evals.test: evals.again computes tasks metrics of split 'test' too, under the same "
        "keys; make them one evaluator",
        "evals.wrong_field.ks: not a field of a 'compound_zero_shot' evaluator (its fields: "
        "every, final, kind, sources, split)",
    ]


def test_an_evaluation_only_source_is_read_only_where_named(tiny_config):
    source = copy.deepcopy(tiny_config.data.sources.rafdb_like.to_dict())
    source["weight"] = 0.0
    del source["validation_size"]
    with tiny_config.unlocked():
        tiny_config.data.sources.held_out = ml_collections.ConfigDict(source)
    assert evaluators.problems(tiny_config) == []   # () means the trained sources only
    assert "held_out" not in evaluators.from_config(tiny_config)[0].sources
    tiny_config.evals.validation.sources = ("held_out",)
    assert evaluators.problems(tiny_config) == [
        "evals.validation.split: 'validation' is not a split of held_out (splits of every "
        "source it reads: test)"]


def test_a_config_saved_before_evaluators_gets_the_evaluations_it_ran(tiny_config):
    values = json.loads(tiny_config.to_json())
    del values["evals"]
    values["train"].update(eval_every=7, eval_split="validation", test_split="test",
                           tune_au_thresholds=True)
    old = checkpointing.config_from_json(values)
    assert "eval_split" not in old.train
    every_source = tuple(pipeline.source_names(tiny_config.data))
    assert old.evals.to_dict() == {
        "validation": evaluators.tasks("validation", sources=every_source, every=7).to_dict(),
        "test": evaluators.tasks("test", sources=every_source, final=True,
                                 au_thresholds_from="validation").to_dict()}
    assert config_checks.validate(old, num_devices=1) == []
    values["train"].update(eval_every=0, eval_split="test", test_split="test",
                           tune_au_thresholds=False)
    one = checkpointing.config_from_json({k: v for k, v in values.items() if k != "evals"})
    assert list(one.evals) == ["test"] and one.evals.test.final and not one.evals.test.every


def test_selection_split_override_and_file_names(tiny_config):
    chosen = evaluators.from_config(tiny_config)
    assert [e.name for e in evaluators.select(chosen, None)] == ["test"]
    assert [e.name for e in evaluators.select(chosen, ["validation", "test"])] == [
        "validation", "test"]
    with pytest.raises(ValueError, match="no evaluator named 'tset'; config.evals has test, "
                                         "validation"):
        evaluators.select(chosen, ["tset"])
    test = chosen[0]
    assert test.on_split("validation").options == {"au_thresholds_from": ""}
    assert test.on_split("other").options == {"au_thresholds_from": "validation"}
    assert evaluate.output_stem([test], None, 4) == "test_step4"
    assert evaluate.output_stem(chosen, ["test", "validation"], 4) == (
        "test+validation@test+validation_step4")
    assert [test.runs_at(s, 10) for s in (0, 5)] == [False, False]
    assert [chosen[1].runs_at(s, 4) for s in (1, 2, 4)] == [False, True, False]  # end: final


COMPOUND_CONFIG = '''
import copy
from fbnet_jax.core import config_files
from fbnet_jax.eval import evaluators

def get_config():
    config = config_files.load("synthetic:tiny")
    source = copy.deepcopy(config.data.sources.rafdb_like)
    source.weight = 0.0
    source.test_size = 66
    source.synthetic.compound = True
    source.synthetic.seed = 21
    with config.unlocked():
        config.data.sources.compound_faces = source
        config.evals.zero = evaluators.compound_zero_shot("test", sources=("compound_faces",))
        config.evals.few = evaluators.compound_few_shot("test", sources=("compound_faces",),
                                                        ks=(1, 2), draws=2)
    return config
'''


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("evaluators_run"), num_steps=2)


def test_fbnet_eval_with_a_config_file_adds_compound_evaluators(tiny_run, tmp_path):
    config_file = tmp_path / "with_compound.py"
    config_file.write_text(COMPOUND_CONFIG)
    result = subprocess.run(
        [sys.executable, "-m", "fbnet_jax", "eval", "--workdir", str(tiny_run), "--config",
         str(config_file), "--evals", "zero,few"], cwd=tmp_path, capture_output=True, text=True,
        timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
    assert result.returncode == 0, result.stderr
    assert "evaluating with data.sources.compound_faces.kind: '<absent>' -> 'synthetic'" in (
        result.stderr)
    written = json.loads((tiny_run / "eval" / "zero+few@test_step2.json").read_text())
    p = "test/compound_faces/compound_"
    assert written[p + "count"] == 66 and written["step"] == 2
    for key in ("zero_shot_accuracy", "zero_shot_uar", "zero_shot_macro_f1", "few_shot_k1_uar",
                "few_shot_k2_uar_std", "few_shot_ncm_k2_accuracy"):
        assert 0.0 <= written[p + key] <= 1.0, key
    assert not any(key.startswith(("test/expression", "test/rafdb_like")) for key in written)
    assert "66 compound faces, 11 classes, chance UAR 0.0909" in result.stderr
    report = tiny_run / "eval" / "zero+few@test_step2" / "report.md"
    assert report.is_file()
    # The same numbers in process, from the evaluators and the checkpoint.
    again = evaluate.evaluate_workdir(tiny_run, config=_load(config_file), names=["few"])
    assert {k: v for k, v in again.items() if "few_shot" in k} == {
        k: v for k, v in written.items() if "few_shot" in k}


def _load(path):
    from fbnet_jax.core import config_files
    return config_files.load(str(path))


def test_training_runs_periodic_compound_evaluators(tmp_path, tiny_config):
    from fbnet_jax.core import config_files
    from fbnet_jax.train import loop as train
    config_file = tmp_path / "with_compound.py"
    config_file.write_text(COMPOUND_CONFIG)
    config = config_files.load(str(config_file))
    config.evals.zero.every = 2
    config.evals.validation.every = 0
    config.train.best_metric = "test/compound_faces/compound_zero_shot_uar"
    final = train.train_and_evaluate(config, tmp_path / "run")
    log = (tmp_path / "run" / "train.log").read_text()
    uar = final["test/compound_faces/compound_zero_shot_uar"]
    assert f"zero on test (compound zero_shot_uar): compound_faces {uar:.4f}" in log
    assert final["test/compound_faces/compound_few_shot_k2_classes"] == 11
    assert "test/expression_accuracy" in final    # the final tasks evaluator as well
    assert compound.format_report(final, "test") in log
