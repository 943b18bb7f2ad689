"""A whole experiment config checked before a run touches anything.

Each layer checks the fields it consumes (`problems(config)` beside the code that reads them:
data_pipelines/checks.py, fbnet_jax/model/checks.py, fbnet_jax/model/losses.py,
fbnet_jax/runtime/state.py, fbnet_jax/runtime/parallel.py, fbnet_jax/eval/evaluators/);
this module checks the `train.*` fields, the run's name and seed, and gathers the rest.
`validate` names every problem at once (the field, what it holds, what is allowed), so a typo in
`evals.test.split` fails in a second, not after the training. `fbnet train` and `fbnet eval`
call it before any work.
"""

from __future__ import annotations

import re

import jax
import ml_collections

from data_pipelines import checks as data_checks
from fbnet_jax.config import restart
from fbnet_jax.core import checks
from fbnet_jax.core.errors import ConfigError
from fbnet_jax.eval import evaluators
from fbnet_jax.model import checks as model_checks
from fbnet_jax.model import losses
from fbnet_jax.runtime import parallel
from fbnet_jax.runtime import state as state_lib

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def problems(config: ml_collections.ConfigDict) -> list[str]:
    """What is wrong with `config.train`, one line each."""
    out: list[str] = []
    train = config.train
    checks.in_range(out, "train.num_steps", train.num_steps, 1, integer=True)
    checks.in_range(out, "train.log_every", train.log_every, 1, integer=True)
    checks.in_range(out, "train.checkpoint_every", train.checkpoint_every, 1, integer=True)
    checks.in_range(out, "train.stop_after_steps", train.stop_after_steps, 0, integer=True)
    checks.in_range(out, "train.profile_steps", train.get("profile_steps", 0), 0, integer=True)
    checks.in_range(out, "train.max_checkpoints_to_keep", train.max_checkpoints_to_keep, 1,
                    integer=True)
    checks.in_range(out, "train.grad_accum_steps", train.grad_accum_steps, 1, integer=True)
    checks.one_of(out, "train.nonfinite", train.nonfinite, ("stop", "skip"))
    checks.in_range(out, "train.nonfinite_max_in_a_row", train.nonfinite_max_in_a_row, 1,
                    integer=True)
    checks.one_of(out, "train.best_mode", train.best_mode, ("max", "min"))
    return out


def _evaluation_problems(config, problems_so_far: list[str], warnings: list[str]) -> list[str]:
    """The evaluators (`evaluators.problems`), and the best-checkpoint metric among theirs."""
    found = evaluators.problems(config)
    if found or any(p.startswith("data.") for p in problems_so_far):
        return found
    configured = evaluators.from_config(config)
    if not any(e.final for e in configured):
        warnings.append("no evaluator of config.evals is final: metrics.json will hold no "
                        "metric and no report is written")
    best = config.train.best_metric
    if not best:
        return []
    periodic = [e for e in configured if e.every]
    if any(best in e.metric_names(config.data.aus) for e in periodic):
        return []
    holders = [e.name for e in configured if best in e.metric_names(config.data.aus)]
    if holders:
        warnings.append(f"train.best_metric is {best!r}, a metric of {', '.join(holders)}, which "
                        f"never runs during training (every = 0): no best checkpoint is kept")
        return []
    names = [n for e in periodic for n in e.metric_names(config.data.aus)]
    headline = [n for n in names if n.count("/") == 1 and "_f1/" not in n]
    return [f"train.best_metric: {best!r} is not a metric of any evaluator that runs "
            f"during training ({', '.join(e.name for e in periodic) or 'none has every > 0'})"
            + (f"; for example {', '.join(headline[:8])} (per source: "
               f"<split>/<source>/<metric>), or '' for none" if headline else "; '' for none")]


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             num_processes: int | None = None) -> list[str]:
    """Checks a whole experiment config; touches no file.

    Args:
      config: the config.
      num_devices, num_processes: what the batch sizes must split over (default: this JAX
        runtime's).

    Returns:
      Warnings: settings that are valid but probably not meant.

    Raises:
      ConfigError: naming every problem found.
    """
    num_devices = jax.device_count() if num_devices is None else num_devices
    num_processes = jax.process_count() if num_processes is None else num_processes
    found: list[str] = []
    warnings: list[str] = []
    if not isinstance(config.name, str) or not _NAME.fullmatch(config.name):
        found.append(f"name: {config.name!r} must be letters, digits, '_', '.' or '-' (it "
                     f"names the default work directory)")
    checks.in_range(found, "seed", config.seed, 0, 2**32, integer=True, high_open=True)
    found += data_checks.problems(config, num_devices, num_processes)
    found += model_checks.problems(config)
    found += losses.problems(config)
    found += state_lib.problems(config)
    found += problems(config)
    found += _evaluation_problems(config, found, warnings)
    found += parallel.problems(config, num_devices)
    if not any(p.startswith(("model.", "data.image_size", "data.aus")) for p in found):
        found += model_checks.build_problems(config)
    if found:
        raise ConfigError(found)
    return warnings + data_checks.warnings(config)


def check_restart(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, *,
                  step: int, allow_changes: bool = False, what: str = "the run") -> list[str]:
    """`fbnet_jax.config.restart.check_restart` with the train state's shapes compared."""
    return restart.check_restart(saved, config, step=step, shape_change=state_lib.shape_change,
                                 allow_changes=allow_changes, what=what)
