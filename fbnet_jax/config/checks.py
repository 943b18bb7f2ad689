"""Checks of a config before a run touches anything, and of a restart against its checkpoint.

`validate` looks at the whole config at once and names every problem (the field, what it holds,
what is allowed), so a typo in `evals.test.split` fails in a second, not after the training.
`check_restart` compares a config with the one stored in a run's checkpoint:

- fields that change neither the trained weights nor the data order (`FREE_FIELDS`: logging,
  checkpoint cadence, the evaluators, data workers), `parallel.mode` (both
  modes give the same numbers) and the non-finite policy may change on any restart;
- a change of the train state's shapes (the model, the AU list, the image size of a backbone
  with dense layers, the optimizer) can never continue a run: the restore would fail;
- any other change (learning rate, steps, seed, sources, weights, ...) makes the continued run a
  different experiment from the one its first steps belong to, and is refused unless asked for
  (`allow_changes`, the `--allow_config_change` flag).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from data_pipelines import pipeline
from fbnet_jax.runtime import checkpointing
from fbnet_jax.eval import evaluators, relatedness
from fbnet_jax.model import losses
from fbnet_jax import model as models
from fbnet_jax.core import taxonomy
from fbnet_jax.runtime import state as state_lib
from fbnet_jax.core.errors import ConfigError

# Fields a restart may change (`*` is one path component).
FREE_FIELDS = (
    "name",
    "data.num_workers", "data.eval_batch_size", "data.read_threads", "data.prefetch_buffer_size",
    "data.worker_buffer_size", "data.validate_records", "data.render_cache_dir",
    "data.render_processes",
    "data.sources.*.validation_size", "data.sources.*.test_size", "data.sources.*.cache",
    "train.log_every", "train.checkpoint_every", "train.stop_after_steps",
    "train.profile_steps", "train.nonfinite",
    "train.nonfinite_max_in_a_row", "parallel.mode",
    "model.init_from",  # read by a fresh run only; a restart restores its checkpoint
    "train.max_checkpoints_to_keep", "train.best_metric", "train.best_mode",
    "evals.*", "evals.*.*",   # the evaluators: what is measured, not what is trained
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _matches(path: str, patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        regex = "\\.".join("[^.]+" if part == "*" else re.escape(part)
                           for part in pattern.split("."))
        if re.fullmatch(regex, path):
            return True
    return False


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted path: leaf value} of a nested mapping (a config's JSON form)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def as_plain(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """A config as plain JSON-like values (tuples become lists), for comparisons."""
    import json  # pylint: disable=g-import-not-at-top
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json())
    return json.loads(json.dumps(config))


def differences(before, after) -> list[tuple[str, Any, Any]]:
    """(dotted path, value before, value after) of every leaf that differs; "<absent>" if missing."""
    a, b = flatten(as_plain(before)), flatten(as_plain(after))
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>"))
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def format_difference(path: str, before: Any, after: Any) -> str:
    return f"{path}: {before!r} -> {after!r}"


# --- validation of one config -------------------------------------------------------------

def _range(problems, path, value, low=None, high=None, *, integer=False, low_open=False,
           high_open=False):
    """Appends a message unless low <= value <= high (with open ends where asked)."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        problems.append(f"{path}: must be an integer, got {value!r}")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        problems.append(f"{path}: must be a finite number, got {value!r}")
        return
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        problems.append(f"{path}: must be {' and '.join(x for x in (lo, hi) if x)}, got {value!r}")


def _one_of(problems, path, value, allowed):
    if value not in allowed:
        problems.append(f"{path}: {value!r} is not one of {', '.join(map(repr, allowed))}")


def _folder_problem(path: str) -> str | None:
    """Why `path` cannot be a folder this process writes into (None: it can)."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            return f"{path} exists and is not a folder"
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        return f"cannot create {path}: {parent} is not a writable folder"
    return None


def _check_data(config, problems, num_devices, num_processes):
    data = config.data
    _range(problems, "data.image_size", data.image_size, 1, integer=True)
    try:
        taxonomy.check_au_list(data.aus)
    except ValueError as e:
        problems.append(f"data.aus: {e}")
    for field in ("global_batch_size", "eval_batch_size"):
        value = data[field]
        _range(problems, f"data.{field}", value, 1, integer=True)
        if isinstance(value, int) and value >= 1:
            for count, what in ((num_devices, "devices"), (num_processes, "processes")):
                if value % count:
                    problems.append(f"data.{field}: {value} does not split evenly over the "
                                    f"{count} {what} of this machine; use a multiple of {count}")
    _range(problems, "data.num_workers", data.num_workers, 0, integer=True)
    _range(problems, "data.worker_buffer_size", data.worker_buffer_size, 1, integer=True)
    _range(problems, "data.read_threads", data.read_threads, 1, integer=True)
    _range(problems, "data.prefetch_buffer_size", data.prefetch_buffer_size, 0, integer=True)
    _range(problems, "data.render_processes", data.get("render_processes", 0), 0, integer=True)
    cache_dir = data.get("render_cache_dir", "")
    if not isinstance(cache_dir, str):
        problems.append(f"data.render_cache_dir: must be a folder or '' (memory), got "
                        f"{cache_dir!r}")
    elif cache_dir:
        problem = _folder_problem(os.path.expanduser(cache_dir))
        if problem:
            problems.append(f"data.render_cache_dir: {problem} (or set it to '' to keep "
                            f"rendered faces in each process's memory)")
    _range(problems, "data.augment.flip", data.augment.flip, 0, 1)
    for field in ("max_shift", "max_scale", "brightness", "contrast"):
        _range(problems, f"data.augment.{field}", data.augment[field], 0, 1, high_open=True)
    source_problems = pipeline.config_problems(data)
    problems.extend(source_problems)
    if source_problems:
        return
    splits = {name: pipeline.source_splits(data.sources[name]) for name in pipeline.source_names(data)}
    untrainable = [name for name, have in splits.items()
                   if "train" not in have and float(data.sources[name].weight) > 0]
    if untrainable:
        problems.append(f"data.sources: {', '.join(untrainable)} have no 'train' split but a "
                        f"weight > 0 (set their weight to 0 to evaluate them only)")


def _check_model(config, problems):
    model = config.model
    if model.backbone not in models.BACKBONES:
        problems.append(f"model.backbone: unknown backbone {model.backbone!r}; known: "
                        f"{', '.join(models.BACKBONES)}")
    elif model.backbone not in model.backbones:
        problems.append(f"model.backbones.{model.backbone}: missing (the settings of the chosen "
                        f"backbone)")
    _one_of(problems, "model.dtype", model.dtype, models.DTYPES)
    if model.num_expressions != len(taxonomy.EXPRESSIONS):
        problems.append(f"model.num_expressions: must be {len(taxonomy.EXPRESSIONS)} (the "
                        f"expressions {', '.join(taxonomy.EXPRESSIONS)}), got "
                        f"{model.num_expressions!r}")
    if model.init_from:
        from fbnet_jax.model import weights  # pylint: disable=g-import-not-at-top
        problem = weights.init_from_problem(model.init_from, model.backbone)
        if problem:
            problems.append(f"model.init_from: {problem}")


def _check_model_builds(config, problems):
    """The model must accept the configured image size (e.g. VGG-FACE's five pools need 32 px)."""
    try:
        model = state_lib.model_for(config)
        size = config.data.image_size
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                                          train=False))
    except Exception as e:  # pylint: disable=broad-except  # any failure to build is the message
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        problems.append(f"model: a {config.model.backbone} with these settings cannot take "
                        f"{config.data.image_size}x{config.data.image_size} images "
                        f"(data.image_size): {first_line}")


def _check_losses(config, problems):
    weights = config.loss.weights
    known = losses.TASK_TERMS + losses.COUPLING_TERMS
    for name in weights.keys():
        if name not in known:
            problems.append(f"loss.weights.{name}: not a loss term; the terms are "
                            f"{', '.join(known)}")
        else:
            _range(problems, f"loss.weights.{name}", weights[name], 0)
    missing = [name for name in losses.TASK_TERMS if name not in weights]
    if missing:
        problems.append(f"loss.weights: no weight for {', '.join(missing)} (0 turns a term off)")
    if all(isinstance(weights[n], (int, float)) and weights[n] == 0 for n in weights.keys()):
        problems.append("loss.weights: all are 0; at least one loss term must be on")
    if any(weights[n] for n in losses.COUPLING_TERMS if n in weights
           and isinstance(weights[n], (int, float))):
        _one_of(problems, "loss.co_annotation.au_targets", config.loss.co_annotation.au_targets,
                losses.CO_ANNOTATION_AU_TARGETS)
        if not isinstance(config.loss.distribution_matching.stop_gradient, bool):
            problems.append(f"loss.distribution_matching.stop_gradient: must be True or False, "
                            f"got {config.loss.distribution_matching.stop_gradient!r}")
        try:
            relatedness.load(config.loss.relatedness, config.data.aus)
        except ConfigError as e:
            problems.extend(e.problems)


def _check_optimizer(config, problems):
    opt = config.optimizer
    _one_of(problems, "optimizer.name", opt.name, state_lib.OPTIMIZERS)
    _one_of(problems, "optimizer.schedule", opt.schedule, state_lib.SCHEDULES)
    _range(problems, "optimizer.learning_rate", opt.learning_rate, 0, low_open=True)
    _range(problems, "optimizer.warmup_steps", opt.warmup_steps, 0, integer=True)
    _range(problems, "optimizer.end_learning_rate_factor", opt.end_learning_rate_factor, 0, 1)
    _range(problems, "optimizer.weight_decay", opt.weight_decay, 0)
    _range(problems, "optimizer.momentum", opt.momentum, 0, 1, high_open=True)
    _range(problems, "optimizer.grad_clip_norm", opt.grad_clip_norm, 0)


def _check_parallel(config, problems, num_devices):
    """The step's compilation mode, and a batch that splits into microbatches on every device."""
    _one_of(problems, "parallel.mode", config.parallel.mode, ("jit", "pmap"))
    k, batch = config.train.grad_accum_steps, config.data.global_batch_size
    if (isinstance(k, int) and k > 1 and isinstance(batch, int) and batch > 0
            and batch % (num_devices * k)):
        problems.append(f"train.grad_accum_steps: {k} microbatches of the "
                        f"data.global_batch_size {batch} do not split evenly over the "
                        f"{num_devices} devices; make the batch a multiple of {num_devices * k}")


def _check_train(config, problems, warnings):
    train = config.train
    _range(problems, "train.num_steps", train.num_steps, 1, integer=True)
    _range(problems, "train.log_every", train.log_every, 1, integer=True)
    _range(problems, "train.checkpoint_every", train.checkpoint_every, 1, integer=True)
    _range(problems, "train.stop_after_steps", train.stop_after_steps, 0, integer=True)
    _range(problems, "train.profile_steps", train.get("profile_steps", 0), 0, integer=True)
    _range(problems, "train.max_checkpoints_to_keep", train.max_checkpoints_to_keep, 1,
           integer=True)
    _range(problems, "train.grad_accum_steps", train.grad_accum_steps, 1, integer=True)
    _one_of(problems, "train.nonfinite", train.nonfinite, ("stop", "skip"))
    _range(problems, "train.nonfinite_max_in_a_row", train.nonfinite_max_in_a_row, 1,
           integer=True)
    _one_of(problems, "train.best_mode", train.best_mode, ("max", "min"))


def _check_evals(config, problems, warnings):
    """The evaluators (`evaluators.problems`), and the best-checkpoint metric among theirs."""
    found = evaluators.problems(config)
    problems.extend(found)
    if found or any(p.startswith("data.") for p in problems):
        return
    configured = evaluators.from_config(config)
    if not any(e.final for e in configured):
        warnings.append("no evaluator of config.evals is final: metrics.json will hold no "
                        "metric and no report is written")
    best = config.train.best_metric
    if not best:
        return
    periodic = [e for e in configured if e.every]
    if any(best in e.metric_names(config.data.aus) for e in periodic):
        return
    holders = [e.name for e in configured if best in e.metric_names(config.data.aus)]
    if holders:
        warnings.append(f"train.best_metric is {best!r}, a metric of {', '.join(holders)}, which "
                        f"never runs during training (every = 0): no best checkpoint is kept")
        return
    names = [n for e in periodic for n in e.metric_names(config.data.aus)]
    headline = [n for n in names if n.count("/") == 1 and "_f1/" not in n]
    problems.append(f"train.best_metric: {best!r} is not a metric of any evaluator that runs "
                    f"during training ({', '.join(e.name for e in periodic) or 'none has every > 0'})"
                    + (f"; for example {', '.join(headline[:8])} (per source: "
                       f"<split>/<source>/<metric>), or '' for none" if headline else
                       "; '' for none"))


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
    problems: list[str] = []
    warnings: list[str] = []
    if not isinstance(config.name, str) or not _NAME.fullmatch(config.name):
        problems.append(f"name: {config.name!r} must be letters, digits, '_', '.' or '-' (it "
                        f"names the default work directory)")
    _range(problems, "seed", config.seed, 0, 2**32, integer=True, high_open=True)
    _check_data(config, problems, num_devices, num_processes)
    _check_model(config, problems)
    _check_losses(config, problems)
    _check_optimizer(config, problems)
    _check_train(config, problems, warnings)
    _check_evals(config, problems, warnings)
    _check_parallel(config, problems, num_devices)
    if not any(p.startswith(("model.", "data.image_size", "data.aus")) for p in problems):
        _check_model_builds(config, problems)
    if problems:
        raise ConfigError(problems)
    return warnings


# --- a restart against the run's checkpoint -----------------------------------------------

def _abstract_state(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """{leaf path: shape and dtype} of the train state the config creates (nothing computed)."""
    model = state_lib.model_for(config)
    tx, _ = state_lib.create_optimizer(config.optimizer, config.train.num_steps)
    shapes = jax.eval_shape(lambda rng: state_lib.init_state(model, tx, rng,
                                                             config.data.image_size),
                            jax.random.PRNGKey(0))
    return {checkpointing.path_name(path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}


def _describe(leaf) -> str:
    return f"{leaf.dtype.name}{list(leaf.shape)}" if leaf is not None else "absent"


def state_differences(before: ml_collections.ConfigDict,
                      after: ml_collections.ConfigDict) -> list[str]:
    """The train state leaves whose shape or dtype differ between two configs, as messages.

    Parameters and BatchNorm statistics come first; the optimizer's copies of them last.
    """
    a, b = _abstract_state(before), _abstract_state(after)
    differ = [p for p in set(a) | set(b)
              if a.get(p) is None or b.get(p) is None or a[p].shape != b[p].shape
              or a[p].dtype != b[p].dtype]
    differ.sort(key=lambda p: (p.startswith("opt_state"), p))
    return [f"{p}: {_describe(a.get(p))} -> {_describe(b.get(p))}" for p in differ]


def shape_change(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                 step: int) -> str | None:
    """None when `config` builds a train state of the checkpoint's shapes, else why not.

    The message names the first leaves that differ and the config fields that change them (each
    differing field is tried alone against the saved config).
    """
    leaves = state_differences(saved, config)
    if not leaves:
        return None
    changed = [d for d in differences(saved, config) if not _matches(d[0], FREE_FIELDS)]
    culprits = [d for d in changed if len(changed) == 1
                or state_differences(saved, _with_field(saved, d[0], d[2]))]
    shown = leaves[:3] + ([f"{len(leaves) - 3} more"] if len(leaves) > 3 else [])
    return (f"the train state in the checkpoint of step {step} has other shapes than this "
            f"config's ({'; '.join(shown)}); changed by "
            f"{'; '.join(format_difference(*d) for d in culprits or changed)}")


def _with_field(config: ml_collections.ConfigDict, path: str, value: Any):
    """A copy of `config` (JSON-derived) with one dotted field set to `value`."""
    plain = as_plain(config)
    node = plain
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return checkpointing.config_from_json(plain)


def check_restart(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, *,
                  step: int, allow_changes: bool = False, what: str = "the run") -> list[str]:
    """Checks that `config` can continue a run whose checkpoint of `step` was saved with `saved`.

    Returns:
      Notes for the log: the accepted differences, one line each (empty: same config).

    Raises:
      ConfigError: the state's shapes differ (never restorable; the fields responsible are
        named), or the training would change and `allow_changes` is False.
    """
    diffs = differences(saved, config)
    if not diffs:
        return []
    free = [d for d in diffs if _matches(d[0], FREE_FIELDS)]
    training = [d for d in diffs if d not in free]
    blocking: list[str] = []
    if training:
        problem = shape_change(saved, config, step)
        if problem:
            blocking.append(problem)
    if blocking:
        raise ConfigError(blocking + ["keep the run's values for these fields, or start a new "
                                      "run in another --workdir"],
                          header=f"cannot continue {what} with this config")
    if training and not allow_changes:
        raise ConfigError(
            [format_difference(*d) for d in training]
            + ["these change the training of a run whose first steps were made without them; "
               "pass --allow_config_change to continue with them anyway (recorded in config.json "
               "and train.log), or start a new run in another --workdir"],
            header=f"the config differs from the one {what} was trained with (its checkpoint of "
                   f"step {step})")
    notes = [f"changed (no effect on the training): {format_difference(*d)}" for d in free]
    notes += [f"changed (--allow_config_change): {format_difference(*d)}" for d in training]
    return notes
