"""What a run says about itself: parameters, compiled step, memory; profiling; its records
(metrics.jsonl)."""

import json
import logging
import math
import re
import time

import pytest
import tensorboardX

from data_pipelines import pipeline
from fbnet_jax.train import checks as config_checks
from fbnet_jax.config import restart
from fbnet_jax.eval import metrics_log
from fbnet_jax.train import loop as train
from fbnet_jax.core.errors import ConfigError


def test_a_run_logs_its_parameters_compiled_step_and_profile(tiny_config, tmp_path):
    tiny_config.train.num_steps = 4
    tiny_config.evals.validation.every = 0
    tiny_config.train.profile_steps = 2
    train.train_and_evaluate(tiny_config, tmp_path)
    log = (tmp_path / "train.log").read_text()
    # clu's parameter table: one row per parameter array, then the total.
    assert re.search(r"\| backbone/Conv_0/kernel +\| \(3, 3, 3, 8\) +\| float32 \| 216 +\|", log)
    assert "Total: 35,074 -- 140,296 bytes" in log
    assert "model: small_cnn, 0.04M parameters" in log
    assert re.search(r"train step compiled in [\d.]+s; per device: [\d.]+ MiB arguments, "
                     r"[\d.]+ MiB outputs \([\d.]+ MiB of them donated\), [\d.]+ MiB "
                     r"temporaries, [\d.]+ MiB code", log), log
    # Steps 2 and 3 of 4 are traced (the first compiles) into <workdir>/profile.
    assert f"profile of steps 2-3 written to {tmp_path / 'profile'}" in log
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))


def test_no_profile_unless_asked(tiny_config, tmp_path):
    tiny_config.train.num_steps = 2
    tiny_config.evals.validation.every = 0
    train.train_and_evaluate(tiny_config, tmp_path)
    assert not (tmp_path / "profile").exists()
    assert "profile of steps" not in (tmp_path / "train.log").read_text()


def test_profile_steps_is_checked_and_free_to_change_on_restart(tiny_config):
    tiny_config.train.profile_steps = -1
    with pytest.raises(ConfigError, match=r"train.profile_steps"):
        config_checks.validate(tiny_config, num_devices=1, num_processes=1)
    assert "train.profile_steps" in restart.FREE_FIELDS


def _strict_json(line: str):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(line, parse_constant=refuse)


def test_a_run_records_what_it_logs(tiny_config, tmp_path, monkeypatch):
    # 4 steps, logged every 2, validation after step 2, the final evaluation after step 4.
    assert (tiny_config.train.num_steps, tiny_config.train.log_every,
            tiny_config.evals.validation.every) == (4, 2, 2)
    logged = {}  # step -> {name: value}, as the loop handed them to TensorBoard
    add_scalar = tensorboardX.SummaryWriter.add_scalar

    def capture(self, name, value, step, *args, **kwargs):
        logged.setdefault(step, {})[name] = value
        return add_scalar(self, name, value, step, *args, **kwargs)

    monkeypatch.setattr(tensorboardX.SummaryWriter, "add_scalar", capture)
    started = time.time()
    train.train_and_evaluate(tiny_config, tmp_path)
    lines = (tmp_path / metrics_log.FILE).read_text().splitlines()
    data = [_strict_json(line) for line in lines]
    assert [(d["kind"], d["step"]) for d in data] == [
        ("start", 0), ("train", 2), ("eval", 2), ("train", 4), ("final", 4)]
    assert all(set(d) == {"kind", "step", "time", "values"} for d in data)
    times = [d["time"] for d in data]
    assert started <= times[0] and times == sorted(times) and times[-1] <= time.time()
    records, path = metrics_log.read(tmp_path)
    assert path == tmp_path / metrics_log.FILE
    assert [(r.kind, r.step, r.time) for r in records] == [
        (d["kind"], d["step"], d["time"]) for d in data]
    # Each step's records hold exactly what TensorBoard got at that step.
    for step in (2, 4):
        at_step = [r.values for r in records if r.step == step]
        assert not set(at_step[0]) & set(at_step[1])
        assert {**at_step[0], **at_step[1]} == logged[step]
    sources = pipeline.source_names(tiny_config.data)
    assert all(set(r.values) == {
        "loss/total", "loss/expression", "loss/au", "loss/va", "grad_norm", "skipped_steps",
        "learning_rate", "steps_per_second", "examples_per_second",
        *(f"data/fraction/{name}" for name in sources)} for r in records if r.kind == "train")
    # The progress lines and the evaluation summary of train.log print the same numbers.
    log_text = (tmp_path / "train.log").read_text()
    for r in records:
        v = r.values
        if r.kind == "train":
            assert (f"step {r.step}/4 ({100 * r.step / 4:3.0f}%) | {v['steps_per_second']:.2f} "
                    f"steps/s {v['examples_per_second']:.0f} ex/s | ") in log_text
            assert (f"| loss {v['loss/total']:.4f} | au {v['loss/au']:.4f} expression "
                    f"{v['loss/expression']:.4f} va {v['loss/va']:.4f} | lr "
                    f"{v['learning_rate']:.2e}\n") in log_text
        elif r.kind == "eval":
            assert (f"validation: expr acc {v['validation/expression_accuracy']:.4f}, "
                    f"expr F1 {v['validation/expression_macro_f1']:.4f}, ") in log_text
    # The final record is metrics.json.
    assert records[-1].values == json.loads((tmp_path / "metrics.json").read_text())


def test_records_keep_non_finite_values_in_strict_json(tmp_path):
    with metrics_log.Writer(tmp_path, None) as writer:
        writer.write("train", 1, {"loss/total": math.nan, "loss/va": math.inf,
                                  "grad_norm": -math.inf, "learning_rate": 0.5})
    line = (tmp_path / metrics_log.FILE).read_text().splitlines()[-1]
    assert _strict_json(line)["values"] == {"loss/total": "nan", "loss/va": "inf",
                                            "grad_norm": "-inf", "learning_rate": 0.5}
    records, _ = metrics_log.read(tmp_path)
    values = records[-1].values
    assert math.isnan(values["loss/total"]) and values["loss/va"] == math.inf
    assert values["grad_norm"] == -math.inf and values["learning_rate"] == 0.5
    with pytest.raises(ValueError, match="not a number"):
        metrics_log.Record.from_line(line.replace('"nan"', '"NaN"'))


def test_a_restart_drops_the_records_after_its_checkpoint(tmp_path, caplog):
    path = tmp_path / metrics_log.FILE
    with metrics_log.Writer(tmp_path, None) as writer:
        for step in (1, 2, 3, 4):
            writer.write("train", step, {"loss/total": float(step)})
        writer.write("eval", 2, {"validation/expression_accuracy": 0.5})
    with path.open("a") as file:
        file.write('{"kind": "train", "step": 5, "ti')  # a line cut short by a kill
    # The checkpoint of step 2 is restored: steps 3 and 4 are done again, recorded again.
    with metrics_log.Writer(tmp_path, 2) as writer:
        writer.write("train", 3, {"loss/total": 30.0})
    steps = [(d["kind"], d["step"]) for d in map(_strict_json, path.read_text().splitlines())]
    assert steps == [("start", 0), ("train", 1), ("train", 2), ("eval", 2), ("start", 2),
                     ("train", 3)]
    records, _ = metrics_log.read(tmp_path)
    assert [(r.kind, r.step) for r in records] == [
        ("start", 0), ("train", 1), ("train", 2), ("eval", 2), ("start", 2), ("train", 3)]
    assert records[-1].values == {"loss/total": 30.0}
    # A final evaluation done again at the same step: the last one is read.
    with metrics_log.Writer(tmp_path, 3) as writer:
        writer.write("final", 3, {"test/expression_accuracy": 0.25})
    with metrics_log.Writer(tmp_path, 3) as writer:
        writer.write("final", 3, {"test/expression_accuracy": 0.75})
    records, _ = metrics_log.read(tmp_path)
    assert [r.values for r in records if r.kind == "final"] == [
        {"test/expression_accuracy": 0.75}]
    # A last record without its newline is kept, and the next one starts a line of its own.
    path.write_text(path.read_text().rstrip("\n"))
    with metrics_log.Writer(tmp_path, 3):
        pass
    *_, last, start = map(_strict_json, path.read_text().splitlines())
    assert (last["kind"], last["values"], start["kind"]) == (
        "final", {"test/expression_accuracy": 0.75}, "start")
    # Without a checkpoint, a run starts the file afresh.
    with metrics_log.Writer(tmp_path, None):
        pass
    assert [(r.kind, r.step) for r in metrics_log.read(tmp_path)[0]] == [("start", 0)]
    # A damaged line elsewhere is skipped, with a warning.
    path.write_text('{"kind": "train"}\n' + path.read_text())
    with caplog.at_level(logging.WARNING, logger="fbnet_jax.eval.metrics_log"):
        assert len(metrics_log.read(tmp_path)[0]) == 1
    assert "1 line(s) that are no record skipped" in caplog.text
