"""Evaluation: the evaluators of a config (fbnet_jax/eval/evaluators/) on a train state.

`evaluate` runs a round of evaluators (training's periodic and final evaluations) with one pass
of the network over each split they read (`Predictions`); `evaluate_workdir` re-evaluates a
checkpoint of a finished or interrupted run, or a checkpoint directory on its own, with the
config stored in it or another that fits it (`fbnet eval`), and writes the metrics and report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from data_pipelines import device_augment, pipeline
from fbnet_jax.runtime import checkpointing, parallel
from fbnet_jax.eval import compound, evaluators, report
from fbnet_jax.config import restart
from fbnet_jax.model import facebehaviornet
from fbnet_jax.runtime import state as state_lib
from fbnet_jax.core.errors import ConfigError, UserError

log = logging.getLogger(__name__)

# Columns of the printed table: (metric key suffix, header), the report's headline metrics.
TABLE_COLUMNS = report.HEADLINE_METRICS


class Interrupted(Exception):
    """An evaluation was abandoned because `should_stop()` became true (SIGTERM, Ctrl-C)."""


def make_predict_fn(model, keys=evaluators.TASK_OUTPUTS):
    """A jitted `(state, image) -> outputs[keys]` with the network in inference mode; a uint8
    image (the pipeline's) is normalised first, on the device."""
    def predict(state, image):
        if image.dtype == jnp.uint8:
            image = device_augment.normalize(image)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return facebehaviornet.infer(model, variables, image, keys)
    return jax.jit(predict)


def restore_checkpoint(workdir: str | Path, config: ml_collections.ConfigDict, step: int, mesh,
                       *, manager=None):
    """The network of `config` and its train state from the run's checkpoint of `step` (or from
    `manager`'s, which is closed after)."""
    model, _, _, abstract = state_lib.create_state(config, mesh, abstract=True)
    manager = manager or checkpointing.create_manager(workdir, read_only=True)
    try:
        state, _ = checkpointing.restore(manager, abstract, step=step)
    finally:
        manager.close()
    return model, state


def predict(model, state, config, split: str, mesh, *, predict_fn=None,
            sources: Sequence[str] | None = None,
            should_stop: Callable[[], bool] | None = None,
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Outputs and labels of every example of `split` of the configured sources.

    Args:
      predict_fn: a `make_predict_fn(model, keys)`; its keys are the outputs returned.
      sources: the sources to read (default: all).
      should_stop: checked before every batch; when it returns True the evaluation is
        abandoned with `Interrupted`, so a stop request never waits for a whole split.

    Returns:
      (outputs, labels): numpy arrays concatenated over the split's batches, padding rows
      included (labels["valid"] is 0 on them).
    """
    predict_fn = predict_fn or make_predict_fn(model)
    outputs, labels = [], []
    batches = pipeline.build_eval_batches(config, split=split, sources=sources)
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


class Predictions:
    """The predict function of a round of evaluators (`evaluators.PredictFn`).

    Each split is run once, over every source and output the round's evaluators read of it,
    when first asked for; each call returns the rows of the sources asked for.

    Args:
      model, state, config, mesh: the network, its train state, the config and mesh.
      round_evaluators: the evaluators of the round (their sources, outputs and splits).
      predict_fns: a dict of compiled `make_predict_fn`s by output keys, shared between rounds
        (filled as needed), so training compiles each once.
      should_stop: see `predict`.
    """

    def __init__(self, model, state, config, mesh, round_evaluators, *, predict_fns=None,
                 should_stop: Callable[[], bool] | None = None):
        self._model, self._state, self._config, self._mesh = model, state, config, mesh
        self._fns = {} if predict_fns is None else predict_fns
        self._should_stop = should_stop
        self._plan: dict[str, tuple[set, set]] = {}
        for evaluator in round_evaluators:
            for split in evaluator.splits:
                sources, keys = self._plan.setdefault(split, (set(), set()))
                sources.update(evaluator.sources)
                keys.update(evaluator.outputs)
        self._index = {name: k for k, name in enumerate(pipeline.source_names(config.data))}
        self._cache: dict[str, tuple[dict, dict]] = {}

    def __call__(self, split: str, sources: Sequence[str], keys: Sequence[str]):
        planned_sources, planned_keys = self._plan.get(split, (set(), set()))
        if not (set(sources) <= planned_sources and set(keys) <= planned_keys):
            raise ValueError(f"{split!r} of {list(sources)} with {list(keys)}: not read by any "
                             f"evaluator of this round")
        if split not in self._cache:
            fn_keys = tuple(sorted(planned_keys))
            if fn_keys not in self._fns:
                self._fns[fn_keys] = make_predict_fn(self._model, fn_keys)
            self._cache[split] = predict(
                self._model, self._state, self._config, split, self._mesh,
                predict_fn=self._fns[fn_keys],
                sources=[s for s in self._index if s in planned_sources],
                should_stop=self._should_stop)
        outputs, labels = self._cache[split]
        rows = np.isin(labels["source"], [self._index[s] for s in sources])
        return ({k: outputs[k][rows] for k in keys}, {k: v[rows] for k, v in labels.items()})


def evaluate(model, state, config, mesh, round_evaluators: Sequence[evaluators.Evaluator], *,
             predict_fns=None, should_stop: Callable[[], bool] | None = None,
             return_predictions: bool = False):
    """The merged metrics of `round_evaluators` on `state`.

    Args:
      model, state, config, mesh: the network, its train state, the run's config and mesh.
      round_evaluators: from `evaluators.from_config(config)` (or `select`ed from it).
      predict_fns: see `Predictions` (saves compilations between rounds).
      should_stop: see `predict`.
      return_predictions: also return the round's `Predictions` (the report reads its arrays).

    Returns:
      A flat dict of every evaluator's keys (fbnet_jax/eval/evaluators/); with
      `return_predictions`, the pair (that dict, the Predictions).
    """
    predictions = Predictions(model, state, config, mesh, round_evaluators,
                              predict_fns=predict_fns, should_stop=should_stop)
    results = evaluators.run(round_evaluators, predictions, pipeline.source_names(config.data),
                             config.data.aus)
    return (results, predictions) if return_predictions else results


def report_split(round_evaluators: Sequence[evaluators.Evaluator]) -> str:
    """The split a round's report shows with tables and plots: its first tasks evaluator's."""
    tasks = [e for e in round_evaluators if e.kind == "tasks"]
    return (tasks or list(round_evaluators))[0].split


def format_round(results: dict[str, float], round_evaluators) -> str:
    """The console report of a round: each tasks evaluator's table (and tuned-threshold line),
    then the compound tables of each split that has them."""
    parts = []
    for e in round_evaluators:
        if e.kind == "tasks":
            parts.append(format_report(results, e.split, e.options["au_thresholds_from"]))
    for split in dict.fromkeys(e.split for e in round_evaluators if e.kind != "tasks"):
        text = compound.format_report(results, split)
        if text:
            parts.append(f"compound expressions on {split!r}:\n{text}")
    return "\n".join(parts)


def write_outputs(results: dict[str, Any], round_evaluators, predictions: Predictions,
                  json_path: Path, report_dir: Path, workdir: Path | None) -> None:
    """Writes a round's metrics as JSON and, when it has evaluators, its report (call on
    process 0)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, sort_keys=True))
    log.info("metrics written to %s", json_path.absolute())
    if not round_evaluators:
        return
    split = report_split(round_evaluators)
    tasks = [e for e in round_evaluators if e.kind == "tasks" and e.split == split]
    outputs = labels = None
    if tasks:
        outputs, labels = predictions(split, tasks[0].sources, evaluators.TASK_OUTPUTS)
    report.report_for_evaluation(results, split, report_dir, outputs, labels, workdir)


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


def format_summaries(results: dict[str, float], round_evaluators) -> list[str]:
    """One line per evaluator of a periodic evaluation: the headline metrics of a tasks
    evaluator (`format_summary`), the UAR of each source of a compound one. (The records of runs
    from before metrics.jsonl are read back from these lines: fbnet_jax/eval/metrics_log.py.)"""
    lines = []
    for e in round_evaluators:
        if e.kind == "tasks":
            lines.append(format_summary(results, e.split))
            continue
        metric = ("zero_shot_uar" if e.kind == "compound_zero_shot"
                  else f"few_shot_k{max(e.options['ks'])}_uar")
        parts = [f"{source} {results[key]:.4f}" for source in e.sources
                 if (key := f"{e.split}/{source}/compound_{metric}") in results]
        lines.append(f"{e.name} on {e.split} (compound {metric}): {', '.join(parts) or '-'}")
    return lines


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


def checkpoint_location(workdir: str | Path | None, checkpoint: str | Path | None,
                        step: int | None):
    """(read-only manager, step, config stored with it, output folder) of the checkpoint that
    `fbnet eval` names: `workdir`'s of `step` (default: latest), or a `checkpoint` directory on
    its own, whose results go beside its `checkpoints/` folder (or beside it, when copied
    elsewhere). The caller closes the manager.

    Raises:
      UserError: no such run, checkpoint or step; both or neither of workdir and checkpoint.
    """
    if bool(workdir) == bool(checkpoint):
        raise UserError("fbnet eval takes --workdir DIR (with --step N to pick a checkpoint) or "
                        "--checkpoint PATH, one of the two")
    if checkpoint:
        if step is not None:
            raise UserError("--step goes with --workdir; a --checkpoint directory is one step "
                            "already")
        path = Path(checkpoint)
        manager, step = checkpointing.open_checkpoint(path)
        root = path.parent.parent if path.parent.name == checkpointing.CHECKPOINT_DIR else (
            path.parent)
        try:
            saved = checkpointing.read_config(manager, step)
        except BaseException:
            manager.close()
            raise
        return manager, step, saved, root
    saved, step = checkpoint_config(workdir, step)
    return checkpointing.create_manager(workdir, read_only=True), step, saved, Path(workdir)


def stored_config(workdir: str | Path | None, checkpoint: str | Path | None,
                  step: int | None) -> ml_collections.ConfigDict:
    """The config stored with the checkpoint `fbnet eval` names (`checkpoint_location`)."""
    manager, _, config, _ = checkpoint_location(workdir, checkpoint, step)
    manager.close()
    return config


def _chosen(config, names: Sequence[str] | None, split: str | None):
    """The evaluators `fbnet eval` runs: those named (default: the final ones), on `split`."""
    try:
        chosen = evaluators.select(evaluators.from_config(config), names)
    except ValueError as e:
        raise UserError(f"--evals: {e}") from e
    if not split:
        return chosen
    source_splits = {n: pipeline.source_splits(config.data.sources[n])
                     for n in pipeline.source_names(config.data)}
    lacking = {e.name: [s for s in e.sources if split not in source_splits[s]] for e in chosen}
    if all(lacking.values()):
        have = sorted(set().union(*(source_splits[s] for e in chosen for s in e.sources)))
        raise UserError(f"--split {split!r} is not a split of the sources of "
                        f"{', '.join(e.name for e in chosen)} (they have: {', '.join(have)})")
    out = []
    for e in chosen:
        if lacking[e.name] and names is None:
            log.info("evaluator %s left out: %s have no %r split", e.name,
                     ", ".join(lacking[e.name]), split)
            continue
        if lacking[e.name]:
            raise UserError(f"--split {split}: evaluator {e.name} reads "
                            f"{', '.join(lacking[e.name])}, which have no {split!r} split")
        if e.options.get("au_thresholds_from") == split:
            log.info("%s: AU thresholds are tuned on %r, the split being scored: only the "
                     "metrics at threshold 0.5 are reported", e.name, split)
        out.append(e.on_split(split))
    return out


def output_stem(chosen, names: Sequence[str] | None, step: int) -> str:
    """The file name of an evaluation's results: its splits and step (`test_step2000`), after
    the evaluators' names when they were chosen by name (`compound_zero_shot@test_step2000`),
    so a partial evaluation never replaces a whole one."""
    stem = "+".join(dict.fromkeys(e.split for e in chosen)) + f"_step{step}"
    return stem if names is None else "+".join(e.name for e in chosen) + "@" + stem


def evaluate_workdir(workdir: str | Path | None = None, split: str | None = None,
                     step: int | None = None, *, config: ml_collections.ConfigDict | None = None,
                     checkpoint: str | Path | None = None,
                     names: Sequence[str] | None = None) -> dict[str, Any]:
    """`fbnet eval`: runs evaluators of a config on a checkpoint and writes metrics and report.

    The checkpoint is the run's in `workdir` of `step` (default: the latest) or a `checkpoint`
    directory on its own. The network comes from it and from the config stored with it; `config`
    (that config with fields changed, or another experiment's config file, e.g. one with more
    evaluators or sources) may replace it as long as it builds a state of the same shapes; the
    caller has validated it (`fbnet_jax.train.checks.validate`, as `fbnet eval` does).

    The evaluators are those of `names` (default: the final ones); `split` runs them on that
    split instead of their own (without `names`, those whose sources lack it are left out).
    AU thresholds are never tuned on the split being scored, since that would flatter it.

    Writes `<root>/eval/<stem>.json` and the report in `<root>/eval/<stem>/` (`output_stem`;
    root: `workdir`, or the run folder holding the checkpoint), logs the tables, and returns
    the metrics with "step".

    Raises:
      UserError: no such checkpoint, evaluator or split; a config that does not fit the
        checkpoint.
    """
    manager, step, saved, root = checkpoint_location(workdir, checkpoint, step)
    try:
        if config is None:
            config = saved
        else:
            problem = state_lib.shape_change(saved, config, step)
            if problem:
                raise ConfigError(problem, header="this config does not fit the checkpoint")
            for difference in restart.differences(saved, config):
                log.info("evaluating with %s", restart.format_difference(*difference))
        chosen = _chosen(config, names, split)
        mesh = parallel.create_mesh()
        model, state = restore_checkpoint(root, config, step, mesh, manager=manager)
    except BaseException:
        manager.close()
        raise
    results, predictions = evaluate(model, state, config, mesh, chosen, return_predictions=True)
    results["step"] = float(step)
    if jax.process_index() == 0:
        stem = output_stem(chosen, names, step)
        log.info("checkpoint of step %d (%s):\n%s", step, ", ".join(e.name for e in chosen),
                 format_round(results, chosen))
        write_outputs(results, chosen, predictions, root / "eval" / f"{stem}.json",
                      root / "eval" / stem, root)
    return results
