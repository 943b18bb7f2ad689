"""Orbax checkpoints: what is kept, what is refused, what comes back."""

import json
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fbnet_jax.runtime import checkpointing
from fbnet_jax.core.errors import UserError


def _config():
    config = ml_collections.ConfigDict({"train": {"widths": (8, 16)}, "name": "x"})
    config.lock()
    return config


def _state(value):
    return {"w": jnp.full((3,), value, jnp.float32), "step": jnp.asarray(int(value), jnp.int32)}


def test_keeps_the_latest_and_the_best(tmp_path):
    manager = checkpointing.create_manager(tmp_path, max_to_keep=1, best_metric="val/acc")
    for step, acc in zip((1, 2, 3, 4), (0.5, 0.9, 0.6, 0.7)):
        checkpointing.save(manager, step, _state(step), config=_config(),
                           metrics={"val/acc": acc})
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 4]
    manager.close()


def test_without_a_best_metric_only_the_latest_are_kept(tmp_path):
    manager = checkpointing.create_manager(tmp_path, max_to_keep=2)
    for step in (1, 2, 3):
        checkpointing.save(manager, step, _state(step), config=_config())
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 3]
    manager.close()


def test_non_finite_metrics_are_refused(tmp_path):
    manager = checkpointing.create_manager(tmp_path)
    with pytest.raises(FloatingPointError, match="non-finite"):
        checkpointing.save(manager, 1, _state(1), config=_config(),
                           metrics={"val/acc": float("nan")})
    manager.wait_until_finished()
    assert manager.all_steps() == []
    manager.close()


def test_restore_latest_and_config(tmp_path):
    manager = checkpointing.create_manager(tmp_path)
    assert checkpointing.restore(manager, checkpointing.abstract_like(_state(0))) is None
    checkpointing.save(manager, 5, _state(5), config=_config())
    checkpointing.save(manager, 7, _state(7), config=_config())
    manager.wait_until_finished()
    state, step = checkpointing.restore(manager, checkpointing.abstract_like(_state(0)))
    assert step == 7
    np.testing.assert_array_equal(state["w"], np.full(3, 7.0))
    manager.close()


def test_load_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpointing.load_config(tmp_path)
    (tmp_path / "config.json").write_text(_config().to_json())
    config = checkpointing.load_config(tmp_path)
    assert config.train.widths == (8, 16)  # JSON lists come back as the tuples configs use
    with pytest.raises(AttributeError):
        config.unknown = 1  # locked
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        checkpointing.load_config(tmp_path)
    assert json.loads(_config().to_json())["name"] == "x"


def test_a_state_holding_nan_or_inf_is_never_checkpointed(tmp_path):
    manager = checkpointing.create_manager(tmp_path)
    checkpointing.save(manager, 1, _state(1), config=_config())
    for bad in (float("nan"), float("inf")):
        state = {"w": jnp.array([1.0, bad, 2.0]), "step": jnp.asarray(2, jnp.int32),
                 "opt": {"mu": jnp.zeros(2)}}
        with pytest.raises(FloatingPointError, match=r"refusing to checkpoint step 2: the train "
                                                     r"state holds NaN or infinite values in w$"):
            checkpointing.save(manager, 2, state, config=_config())
    manager.wait_until_finished()
    assert manager.all_steps() == [1]
    manager.close()


def test_non_finite_leaves_names_every_bad_leaf():
    state = {"params": {"a": jnp.array([jnp.nan]), "b": jnp.ones(3)},
             "opt": [jnp.array([jnp.inf, 0.0])], "count": jnp.asarray(3)}
    assert checkpointing.non_finite_leaves(state) == ["opt/0", "params/a"]
    assert checkpointing.non_finite_leaves({"x": jnp.ones(2)}) == []


def test_a_checkpoint_carries_its_config(tmp_path):
    manager = checkpointing.create_manager(tmp_path)
    checkpointing.save(manager, 3, _state(3), config=_config())
    manager.wait_until_finished()
    config = checkpointing.read_config(manager, 3)
    manager.close()
    assert config.train.widths == (8, 16) and config.name == "x"
    assert checkpointing.saved_steps(tmp_path) == [3]
    assert checkpointing.saved_steps(tmp_path / "nothing") == []
    assert not (tmp_path / "nothing").exists()  # looking creates nothing


def test_a_damaged_checkpoint_is_named_in_one_message(tmp_path):
    manager = checkpointing.create_manager(tmp_path)
    checkpointing.save(manager, 5, _state(5), config=_config())
    manager.wait_until_finished()
    for item in (tmp_path / "checkpoints" / "5" / "state" / "d").iterdir():
        item.write_bytes(b"garbage")  # the array data of the state
    with pytest.raises(UserError, match=r"checkpoints/5: the checkpoint of step 5 cannot be read "
                                        r"\(ValueError: .*\); it is damaged or incomplete: move"):
        checkpointing.restore(manager, checkpointing.abstract_like(_state(0)), step=5)
    shutil.rmtree(tmp_path / "checkpoints" / "5" / "config")
    with pytest.raises(UserError, match=r"\(KeyError: Item \"config\" was not found"):
        checkpointing.read_config(manager, 5)
    manager.close()
