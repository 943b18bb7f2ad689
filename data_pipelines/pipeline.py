"""The input pipeline's entry points: training batches, evaluation batches, source entries.

Training (`build_train_iterator`) draws an endless stream of per-process batches from a weighted
mixture of sources; global batch n is a function of the config and n alone, whatever the number
of processes reading it. Evaluation (`build_eval_batches`) visits every example of every
source's evaluation split exactly once, padding so that no example is dropped and every process
runs the same number of steps. A train iterator with `config.data.num_workers > 0` must be
closed (`close_iterator`; see data_pipelines.mixture).

The `source` index of an example is the position of its source in `source_names(config.data)`.

This module holds `config_problems` (what is wrong with a config's sources, checked before any
data is read) and re-exports the names callers use from the modules that do the work; of
these, each imports only modules listed before it, and none imports this one:

  source_config  the entries of `config.data.sources`: kinds, names, splits; reads no data
  source_build   an entry -> a random-access source (`build_source`, `render_ahead`)
  batching       what training and evaluation share: a process's rows, the fixed transforms
  mixture        the training order (`build_train_iterator`; worker processes: `workers`)
  eval_batches   the evaluation batches (`build_eval_batches`)
"""

from __future__ import annotations

import math

import ml_collections

from data_pipelines.eval_batches import build_eval_batches
from data_pipelines.mixture import build_train_iterator, close_iterator, source_counts
from data_pipelines.source_build import build_source, render_ahead
from data_pipelines.source_config import (
    SOURCE_KINDS,
    dataset_problems,
    dataset_source,
    is_dataset,
    prepared_source,
    render_cache_fields,
    source_names,
    source_splits,
)

__all__ = [
    "SOURCE_KINDS",
    "build_eval_batches",
    "build_source",
    "build_train_iterator",
    "close_iterator",
    "config_problems",
    "dataset_source",
    "prepared_source",
    "render_ahead",
    "render_cache_fields",
    "source_counts",
    "source_names",
    "source_splits",
]


def config_problems(data_config: ml_collections.ConfigDict) -> list[str]:
    """What is wrong with `config.data`'s sources, one message per problem (empty: nothing).

    Checks what can be checked without reading any data: known kinds, mixture weights, and the
    sizes of generated sources. Field names in messages are full paths (`data.sources.x.weight`).
    """
    names = source_names(data_config)
    if not names:
        return ["data.sources: empty; the mixture needs at least one source"]
    problems = []
    for name in names:
        source = data_config.sources[name]
        path = f"data.sources.{name}"
        if source.kind not in SOURCE_KINDS:
            problems.append(f"{path}.kind: unknown kind {source.kind!r}; known: "
                            f"{', '.join(SOURCE_KINDS)}")
            continue
        weight = float(source.weight)
        if not (math.isfinite(weight) and weight >= 0):
            problems.append(f"{path}.weight: must be finite and >= 0, got {source.weight}")
        if is_dataset(source.kind):
            problems += dataset_problems(path, source)
        if source.kind == "synthetic":
            if source.synthetic.num_records < 1:
                problems.append(f"{path}.synthetic.num_records: must be >= 1, got "
                                f"{source.synthetic.num_records}")
            for split in source_splits(source):
                if split != "train" and source[f"{split}_size"] < 1:
                    problems.append(f"{path}.{split}_size: must be >= 1, got "
                                    f"{source[f'{split}_size']}")
    if not problems and sum(float(data_config.sources[n].weight) for n in names) <= 0:
        problems.append(f"data.sources.*.weight: all weights are 0 ({', '.join(names)}); "
                        f"at least one source must be trained on")
    return problems
