"""What a run says about itself at start: parameters, compiled step, memory; profiling."""

import re

import pytest

from fbnet_jax import config_checks, train
from fbnet_jax.errors import ConfigError


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
    assert "train.profile_steps" in config_checks.FREE_FIELDS
