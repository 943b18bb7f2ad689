"""The entries of `config.data.sources`: how configs make them, and what they say.

An entry's `kind` picks what it reads: generated faces ("synthetic"), a dataset folder (a name
of `data_pipelines.sources.DATASETS`, entry made by `dataset_source`) or the copy `fbnet prepare`
wrote ("prepared", entry made by `prepared_source`). This module reads no data: it names the
sources (`source_names`, whose order is the `source` index of their examples), lists their
splits and render-cache fields, and says what is wrong with a dataset entry.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from data_pipelines import sources as datasets


# The source kinds `build_source` knows: generated faces, every dataset format of
# data_pipelines.sources (config entries made by `dataset_source`), and the copies that
# `fbnet prepare` writes (entries made by `prepared_source`).
SOURCE_KINDS = ("synthetic", "prepared", *sorted(datasets.DATASETS))
# The splits every dataset source provides (data_pipelines.sources: each dataset's convention).
DATASET_SPLITS = ("test", "train", "validation")


def is_dataset(kind: str) -> bool:
    """Whether `kind` reads a dataset: its folder, or its prepared copy."""
    return kind == "prepared" or kind in datasets.DATASETS


def prepared_source(dataset: str, data_dir: str = "", *, weight: float = 1.0,
                    margin: float = 0.2, balance_expressions: bool = False,
                    prepared_image_size: int = 0, **options) -> ml_collections.ConfigDict:
    """The config entry of a prepared dataset: `kind="prepared"`, `dataset`, `data_dir`.

    It reads what `fbnet prepare --dataset DATASET --data_dir DATA_DIR` wrote with the same
    options, margin and image_size (see `dataset_source` for the arguments). Equivalently, a
    `dataset_source` entry with its `prepared` field set to DATA_DIR.
    """
    entry = dataset_source(dataset, "", weight=weight, margin=margin,
                           balance_expressions=balance_expressions,
                           prepared_image_size=prepared_image_size, **options)
    del entry["root"], entry["prepared"], entry["strict"]
    entry.kind, entry.dataset, entry.data_dir = "prepared", dataset, data_dir
    return entry


def dataset_source(kind: str, root: str = "", *, weight: float = 1.0, margin: float = 0.2,
                   strict: bool = False, balance_expressions: bool = False, prepared: str = "",
                   prepared_image_size: int = 0, **options) -> ml_collections.ConfigDict:
    """The config entry of a dataset source (`config.data.sources.NAME`).

    Args:
      kind: a dataset name of `data_pipelines.sources.DATASETS` ("rafdb", "affwild2", ...).
      root: the dataset's folder as its publisher ships it (or the manifest file); usually
        given on the command line: `--config.data.sources.NAME.root=/path`.
      weight: the source's share of the training mixture (normalised over the sources).
      margin: face crops are widened by this fraction of the face box on every side.
      strict: stop at the first record that cannot be read instead of skipping and counting.
      prepared: the `--data_dir` of `fbnet prepare`: read the prepared copy of this dataset
        (with these options and margin) instead of the files under `root`.
      prepared_image_size: which preparation to read: 0 the faces as served (PNG), N the one
        written with `--option image_size=N` (raw uint8 N x N faces, read without decoding;
        set N to `data.image_size` so that nothing is resized either).
      balance_expressions: sample the source's training images so that every expression is
        equally frequent among its expression-labelled ones (real expression data is skewed:
        in AffectNet's training set Happiness outnumbers Disgust about 35 to 1).
      **options: the dataset's own options (`data_pipelines.sources.reader_options(kind)`),
        e.g. `task="va"` for affwild2.
    """
    known = datasets.reader_options(kind)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{kind}: unknown option(s) {', '.join(unknown)}; its options: "
                         f"{', '.join(known) or 'none'}")
    # Every option is in the entry (with its default), so any can be set from the command line.
    return ml_collections.ConfigDict({
        "kind": kind, "root": root, "weight": weight, "margin": margin, "strict": strict,
        "balance_expressions": balance_expressions, "prepared": prepared,
        "prepared_image_size": prepared_image_size,
        "options": ml_collections.ConfigDict({**known, **options})})


def source_names(data_config: ml_collections.ConfigDict) -> list[str]:
    """The names of the mixture's sources; position = the `source` index of their examples.

    This is the order in which `data_config.sources` iterates: alphabetical for a ConfigDict
    built with the default `sort_keys=True`, insertion order for `sort_keys=False`.
    """
    return list(data_config.sources.keys())


def source_splits(source_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The splits a source provides, e.g. ("test", "train", "validation").

    A synthetic source has "train" plus one split per `<split>_size` field of its config.
    """
    if source_config.kind == "synthetic":
        sizes = sorted(k[:-len("_size")] for k in source_config.keys() if k.endswith("_size"))
        return tuple(sorted(["train", *sizes]))
    if is_dataset(source_config.kind):
        return DATASET_SPLITS
    raise ValueError(f"unknown source kind {source_config.kind!r}; known kinds: {SOURCE_KINDS}")


def render_cache_fields(data_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`build_source`'s render-cache arguments from `config.data` (configs saved before the
    fields existed cache in memory)."""
    return dict(render_cache_dir=str(data_config.get("render_cache_dir", "") or ""),
                render_processes=int(data_config.get("render_processes", 0)))


def dataset_problems(path: str, source: ml_collections.ConfigDict) -> list[str]:
    """What is wrong with the dataset source's entry at `path` (`data.sources.NAME`, for the
    messages), checked without reading its labels."""
    problems = []
    prepared_kind = source.kind == "prepared"
    fields = (("dataset", "data_dir") if prepared_kind else ("root", "strict")) + (
        "options", "margin", "balance_expressions")
    missing = [f for f in fields if f not in source]
    if missing:
        maker = "prepared_source" if prepared_kind else "dataset_source"
        return [f"{path}: a {source.kind} source needs the fields {', '.join(missing)} "
                f"(build its entry with data_pipelines.pipeline.{maker})"]
    dataset = source.dataset if prepared_kind else source.kind
    if dataset not in datasets.DATASETS:
        return [f"{path}.dataset: unknown dataset {dataset!r}; known: "
                f"{', '.join(sorted(datasets.DATASETS))}"]
    root = "" if prepared_kind else str(source.root or "")
    prepared = str((source.data_dir if prepared_kind else source.get("prepared", "")) or "")
    field = "data_dir" if prepared_kind else "prepared"
    if prepared_kind and not prepared:
        problems.append(f"{path}.data_dir: empty; give the --data_dir of fbnet prepare with "
                        f"--config.{path}.data_dir=/path/to/it")
    elif prepared:
        if not os.path.isdir(prepared):
            problems.append(f"{path}.{field}: {prepared} is not a folder (the --data_dir of "
                            f"fbnet prepare)")
    elif not root:
        problems.append(f"{path}.root: empty; give the {source.kind} dataset's folder with "
                        f"--config.{path}.root=/path/to/it (or a prepared copy's folder with "
                        f"--config.{path}.prepared=DATA_DIR)")
    elif not os.path.exists(root):
        problems.append(f"{path}.root: {root} does not exist")
    if not isinstance(source.get("balance_expressions", False), bool):
        problems.append(f"{path}.balance_expressions: must be True or False")
    known = datasets.reader_options(dataset)
    unknown = sorted(set(source.options.keys()) - set(known))
    if unknown:
        problems.append(f"{path}.options: {dataset} has no option(s) {', '.join(unknown)}; "
                        f"its options: {', '.join(known) or 'none'}")
    if not float(source.margin) >= 0:
        problems.append(f"{path}.margin: must be >= 0, got {source.margin}")
    size = source.get("prepared_image_size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        problems.append(f"{path}.prepared_image_size: must be an int >= 0 (0: the preparation "
                        f"of faces as served), got {size!r}")
    return problems
