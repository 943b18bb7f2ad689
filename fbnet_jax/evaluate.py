"""Evaluation: every example of a split once, exact metrics per source and for the mixture.

`evaluate` runs inside training (periodic validation, final test); `evaluate_workdir` re-evaluates
a checkpoint of a finished or interrupted run with the config stored in that checkpoint
(`fbnet eval`), optionally with evaluation settings changed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from data_pipelines import pipeline
from fbnet_jax import checkpointing, config_checks, metrics, parallel, report
from fbnet_jax import state as state_lib
from fbnet_jax.errors import ConfigError, UserError

log = logging.getLogger(__name__)

# Columns of the printed table: (metric key suffix, header).
TABLE_COLUMNS = (
    ("expression_accuracy", "expr acc"), ("expression_macro_f1", "expr F1"),
    ("au_mean_f1", "AU F1"), ("au_accuracy", "AU acc"),
    ("va_ccc_valence", "CCC V"), ("va_ccc_arousal", "CCC A"), ("va_mean_ccc", "CCC mean"),
)
OUTPUT_KEYS = ("expression_logits", "au_logits", "va")


class Interrupted(Exception):
    """An evaluation was abandoned because `should_stop()` became true (SIGTERM, Ctrl-C)."""


def make_predict_fn(model, keys=OUTPUT_KEYS):
    """A jitted `(state, image) -> outputs[keys]` with the network in inference mode."""
    def predict(state, image):
        outputs = model.apply({"params": state.params, "batch_stats": state.batch_stats}, image,
                              train=False)
        return {k: outputs[k] for k in keys}
    return jax.jit(predict)


def restore_checkpoint(workdir: str | Path, config: ml_collections.ConfigDict, step: int, mesh):
    """The network of `config` and its train state from the run's checkpoint of `step`."""
    model, _, _, abstract = state_lib.create_state(config, mesh, abstract=True)
    manager = checkpointing.create_manager(workdir, read_only=True)
    try:
        state, _ = checkpointing.restore(manager, abstract, step=step)
    finally:
        manager.close()
    return model, state


def predict(model, state, config, split: str, mesh, *, predict_fn=None,
            should_stop: Callable[[], bool] | None = None,
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Outputs and labels of every example of `split` of every configured source.

    Args:
      should_stop: checked before every batch; when it returns True the evaluation is
        abandoned with `Interrupted`, so a stop request never waits for a whole split.

    Returns:
      (outputs, labels): numpy arrays concatenated over the split's batches, padding rows
      included (labels["valid"] is 0 on them).
    """
    predict_fn = predict_fn or make_predict_fn(model)
    outputs, labels = [], []
    batches = pipeline.build_eval_batches(config, split=split)
    for local_batch in tqdm.tqdm(batches, desc=f"eval {split}", unit="batch", leave=False,
                                 disable=None if jax.process_index() == 0 else True):
        if should_stop is not None and should_stop():
            raise Interrupted(f"evaluation of {split!r} interrupted")
        batch = parallel.global_batch(local_batch, mesh)
        outputs.append(parallel.to_host(predict_fn(state, batch["image"])))
        labels.append(parallel.to_host({k: v for k, v in batch.items() if k != "image"}))
    if not outputs:
        raise ValueError(f"split {split!r} has no examples in any source")
    return ({k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]},
            {k: np.concatenate([b[k] for b in labels]) for k in labels[0]})


def evaluate(model, state, config, split: str, mesh, *, threshold_split: str | None = None,
             predict_fn=None, should_stop: Callable[[], bool] | None = None,
             return_arrays: bool = False):
    """Metrics of `state` on every example of `split` of every configured source.

    Args:
      model, state, config, mesh: the network, its train state, the run's config and mesh.
      split: the split to evaluate.
      threshold_split: when given, also the AU metrics at per-AU thresholds chosen on this
        split (e.g. "validation"), under `{split}/au_tuned_*` and `{split}/au_threshold/*`.
      predict_fn: a `make_predict_fn(model)` to reuse (saves a compilation).
      should_stop: see `predict`.
      return_arrays: also return the split's (outputs, labels) as `predict` gives them (for the
        report's plots).

    Returns:
      A flat dict: `{split}/{metric}` for the whole split and `{split}/{source}/{metric}` for
      each source (keys as in fbnet_jax.metrics.evaluate_arrays); with `return_arrays`, the
      pair (that dict, (outputs, labels)).
    """
    predict_fn = predict_fn or make_predict_fn(model)
    outputs, labels = predict(model, state, config, split, mesh, predict_fn=predict_fn,
                              should_stop=should_stop)
    results = metrics.evaluate_arrays(outputs, labels, pipeline.source_names(config.data),
                                      aus=config.data.aus, prefix=split)
    if threshold_split:
        tune_outputs, tune_labels = predict(model, state, config, threshold_split, mesh,
                                            predict_fn=predict_fn, should_stop=should_stop)
        results.update(metrics.tuned_au_metrics(tune_outputs, tune_labels, outputs, labels,
                                                aus=config.data.aus, prefix=split))
    return (results, (outputs, labels)) if return_arrays else results


def _rows(results: dict[str, float], split: str) -> list[tuple[str, str]]:
    """(row name, key prefix) for the whole split and each source present in `results`."""
    rows = [("all", f"{split}/")]
    sources = sorted({k.split("/")[1] for k in results
                      if k.startswith(f"{split}/") and k.count("/") >= 2
                      and any(k.endswith("/" + c) for c, _ in TABLE_COLUMNS)})
    return rows + [(s, f"{split}/{s}/") for s in sources]


def format_table(results: dict[str, float], split: str) -> str:
    """A fixed-width table: one row for the whole split, one per source; '-' where unlabelled."""
    rows = _rows(results, split)
    name_width = max(len(name) for name, _ in rows)
    header = " | ".join([f"{'source':<{name_width}}"] + [f"{h:>8}" for _, h in TABLE_COLUMNS])
    lines = [header, "-" * len(header)]
    for name, prefix in rows:
        cells = []
        for key, _ in TABLE_COLUMNS:
            value = results.get(prefix + key)
            cells.append(f"{value:8.4f}" if value is not None else f"{'-':>8}")
        lines.append(" | ".join([f"{name:<{name_width}}"] + cells))
    return "\n".join(lines)


def format_tuned(results: dict[str, float], split: str, threshold_split: str) -> str:
    """The line for AU metrics at thresholds tuned on another split ('' when not computed)."""
    key = f"{split}/au_tuned_mean_f1"
    if key not in results:
        return ""
    return (f"AU mean F1 at per-AU thresholds tuned on {threshold_split!r}: {results[key]:.4f} "
            f"(accuracy {results[f'{split}/au_tuned_accuracy']:.4f})")


def format_report(results: dict[str, float], split: str, threshold_split: str | None) -> str:
    """The table, and the tuned-threshold line when there is one."""
    tuned = format_tuned(results, split, threshold_split) if threshold_split else ""
    return format_table(results, split) + (f"\n{tuned}" if tuned else "")


def format_summary(results: dict[str, float], split: str) -> str:
    """One line with the headline metrics of the whole split."""
    parts = [f"{header} {results[f'{split}/{key}']:.4f}" for key, header in TABLE_COLUMNS
             if f"{split}/{key}" in results]
    return f"{split}: " + ", ".join(parts)


def checkpoint_config(workdir: str | Path,
                      step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
    """The config stored with a run's checkpoint of `step` (default: the latest), and the step.

    Raises:
      UserError: `workdir` holds no checkpoint, or none of `step` (the message lists the steps
        there are).
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"--workdir {workdir}: no such directory")
    steps = checkpointing.saved_steps(workdir)
    if not steps:
        raise UserError(f"{checkpointing.checkpoint_dir(workdir)}: no checkpoint to evaluate; is "
                        f"{workdir} the work directory of a run that saved one?")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"--step {step}: the run in {workdir} has no checkpoint of that step; "
                        f"it has {', '.join(map(str, steps))}")
    manager = checkpointing.create_manager(workdir, read_only=True)
    try:
        return checkpointing.read_config(manager, step), step
    finally:
        manager.close()


def evaluate_workdir(workdir: str | Path, split: str | None = None, step: int | None = None, *,
                     config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """Re-evaluates a checkpoint of the run in `workdir` (default: the latest).

    The network and its state come from the checkpoint and the config stored with it; `config`
    (that config with evaluation settings changed, e.g. `data.eval_batch_size` or the sources'
    evaluation splits) may replace it as long as it builds a state of the same shapes.

    AU metrics at tuned thresholds are reported when the run tunes them and the thresholds'
    split (`train.eval_split`) is not the split being scored, since thresholds tuned on the
    scored split would flatter it.

    Writes `workdir/eval/{split}_step{N}.json`, prints the table, and returns the metrics.

    Raises:
      UserError: no such checkpoint or split; a config that does not fit the checkpoint.
    """
    workdir = Path(workdir)
    saved, step = checkpoint_config(workdir, step)
    if config is None:
        config = saved
    else:
        config_checks.validate(config)
        problem = config_checks.shape_change(saved, config, step)
        if problem:
            raise ConfigError(problem, header="these overrides do not fit the checkpoint")
        for difference in config_checks.differences(saved, config):
            log.info("evaluating with %s", config_checks.format_difference(*difference))
    split = split or config.train.test_split
    config_checks.check_split(config, split, what="--split")
    threshold_split = None
    if config.train.tune_au_thresholds:
        if config.train.eval_split == split:
            log.info("AU thresholds are tuned on %r, the split being scored: only the metrics at "
                     "threshold 0.5 are reported", split)
        else:
            threshold_split = config.train.eval_split
    mesh = parallel.create_mesh()
    model, state = restore_checkpoint(workdir, config, step, mesh)
    results, (outputs, labels) = evaluate(model, state, config, split, mesh,
                                          threshold_split=threshold_split, return_arrays=True)
    results["step"] = float(step)
    if jax.process_index() == 0:
        out = workdir / "eval" / f"{split}_step{step}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(results, indent=2, sort_keys=True))
        log.info("checkpoint of step %d on %r:\n%s", step, split,
                 format_report(results, split, threshold_split))
        log.info("metrics written to %s", out.absolute())
        report.report_for_evaluation(results, split, out.with_suffix(""), outputs,
                                     labels, workdir)
    return results
