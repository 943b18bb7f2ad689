"""A contact sheet of what the model is fed: the first examples of a config's real pipeline.

`python -m data_pipelines.synthetic` shows a generator's raw records. This builds the data
pipeline of an experiment config, exactly as training and evaluation do, and draws its first
examples: each image after resize, augmentation (train only, on the device as the train step
does it: data_pipelines/device_augment.py) and normalisation, mapped back to uint8 and
enlarged with nearest neighbour, and under it the source name and the labels as
masked, i.e. only what the losses see:

  source         affwild2_like
  expression     Happiness          "expr –" when expression_mask is 0
  action units   AU 1 2 12 (12 lab.)   active AUs among the labelled ones, and how many are
                                       labelled; "AU none (17 lab.)"; "AU –" when none is
  valence/arousal V +0.42 A -0.10   "VA –" when va_mask is 0

The train split gives the first batches of `pipeline.build_train_iterator` (shuffled, mixed by
weight, augmented: exactly what training consumes first); validation and test give the first
examples of `pipeline.build_eval_batches` (every source in turn, padding rows skipped).

  python -m data_pipelines.contact_sheet --config configs/synthetic.py[:VARIANT] --out fed.png
      [--split train|validation|test] [--n 48] [--seed S]

`--config` takes what `fbnet train --config` takes (fbnet_jax/core/config_files.py), so a shipped
config is found by name (`synthetic:tiny`) from any directory.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from data_pipelines import device_augment, pipeline, schema, tiles
from fbnet_jax.core import config_files, images, taxonomy
from fbnet_jax.core.errors import UserError

__all__ = ["SPLITS", "draw", "first_examples", "main", "tile_caption", "to_display"]

SPLITS = ("train", "validation", "test")

# Images are enlarged by the smallest integer factor that makes them at least this many pixels
# wide, so a 32 px input is legible; tiles are at least TILE_WIDTH wide so that a typical AU line
# ("AU 1 2 4 5 6 7 (17 lab.)") fits on one line.
DISPLAY_SIDE = 128
TILE_WIDTH = 160
TEXT_LINES = 6   # source, expression, AUs (up to 3 lines for 17 AUs), VA

_DASH = "\u2013"   # en dash: "not labelled"


def _take(batches: Iterable[Mapping[str, Any]], n: int) -> dict[str, np.ndarray]:
    """The first `n` real rows of `batches` (rows with `valid` == 0 are padding), stacked."""
    parts, count = [], 0
    for batch in batches:
        batch = {field: np.asarray(value) for field, value in batch.items()}
        if schema.VALID in batch:
            keep = batch[schema.VALID] > 0
            batch = {field: value[keep] for field, value in batch.items()}
        parts.append(batch)
        count += len(batch[schema.SOURCE])
        if count >= n:
            break
    if not parts:
        return {}
    # Copies: a batch from a grain worker lives in shared memory that the iterator frees.
    return {field: np.concatenate([part[field] for part in parts])[:n] for field in parts[0]}


def first_examples(config: ml_collections.ConfigDict, split: str,
                   n: int) -> dict[str, np.ndarray]:
    """The first `n` examples the pipeline of `config` gives for `split`, as one batch dict.

    Args:
      config: the experiment config.
      split: "train" (the train iterator: augmented, mixed by weight) or an evaluation split.
      n: examples wanted; an evaluation split may have fewer.

    Returns:
      Batch fields (`image` float32 [m, H, W, 3], the model input: augmented for "train",
      normalised; labels and masks, `source`, `key`), m = min(n, examples available); empty
      if the split has no examples.

    Raises:
      ValueError: the pipeline cannot be built from `config` (see `pipeline`).
    """
    if split == "train":
        iterator = pipeline.build_train_iterator(config, process_index=0, process_count=1)
        try:
            return _take(_augmented(iterator, config), n)
        finally:
            # Stops worker processes (num_workers > 0) and frees their shared memory.
            pipeline.close_iterator(iterator)
    batches = iter(pipeline.build_eval_batches(config, split=split, process_index=0,
                                               process_count=1))
    try:
        taken = _take(batches, n)
    finally:
        batches.close()   # closes the grain iterator inside when we stop early
    if taken:
        taken[schema.IMAGE] = images.to_model_input(taken[schema.IMAGE])
    return taken


def _augmented(batches: Iterable[Mapping[str, Any]],
               config: ml_collections.ConfigDict) -> Iterable[dict[str, Any]]:
    """Training batches as the train step makes them: batch n augmented with the keys of step n
    (the model input, float32)."""
    augment = jax.jit(device_augment.DeviceAugment.from_config(config.data.augment).augment)
    for step, batch in enumerate(batches):
        keys = device_augment.example_keys(config.seed, step, batch[schema.ROW])
        yield {**batch, schema.IMAGE: np.asarray(augment(batch[schema.IMAGE], keys))}


def to_display(model_input: np.ndarray) -> np.ndarray:
    """Undoes `fbnet_jax.core.images.to_model_input`: float32 x * SCALE + OFFSET -> the uint8 x.

    Exact for every normalised uint8 value (the scale is a power of two); values outside the
    uint8 range are clipped.
    """
    pixels = (np.asarray(model_input, np.float32) - images.OFFSET) / images.SCALE
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def tile_caption(batch: Mapping[str, Any], row: int, source_names: Sequence[str],
                 aus: Sequence[int]) -> list[str]:
    """The text under one tile: the example's source and its labels as the losses see them.

    Args:
      batch: batch fields (`source`, `expression`, `expression_mask`, `compound`,
        `compound_mask`, `au`, `au_mask`, `va`, `va_mask`).
      row: the example's row in `batch`.
      source_names: names by source index (`pipeline.source_names`).
      aus: the AU list (`config.data.aus`), in `au` order.

    Returns:
      Lines: source name; expression (a compound class when only that is labelled, "expr –"
      when neither is); active labelled AUs with the number labelled ("AU 1 2 12 (12 lab.)",
      "AU none (17 lab.)", "AU –" when no AU is labelled); "V +0.42 A -0.10" or "VA –".
    """
    def field(name):
        return np.asarray(batch[name])[row]

    lines = [source_names[int(field(schema.SOURCE))]]
    if field("expression_mask") > 0:
        lines.append(taxonomy.EXPRESSIONS[int(field(schema.EXPRESSION))])
    elif field("compound_mask") > 0:
        lines.append(taxonomy.RAF_COMPOUND_CLASSES[int(field(schema.COMPOUND))])
    else:
        lines.append(f"expr {_DASH}")
    labelled = field("au_mask") > 0
    if labelled.any():
        # Masked-out AUs carry a safe 0 in `au`, so only labelled ones may count as active.
        active = [str(au) for au, on in zip(aus, labelled & (field(schema.AU) > 0.5)) if on]
        lines.append(f"AU {' '.join(active) or 'none'} ({int(labelled.sum())} lab.)")
    else:
        lines.append(f"AU {_DASH}")
    if field("va_mask") > 0:
        valence, arousal = field(schema.VA)
        lines.append(f"V {valence:+.2f} A {arousal:+.2f}")
    else:
        lines.append(f"VA {_DASH}")
    return lines


def zoom_for(image_size: int) -> int:
    """The nearest-neighbour enlargement of `image_size` px images on the sheet."""
    return max(1, math.ceil(DISPLAY_SIDE / image_size))


def draw(batch: Mapping[str, Any], source_names: Sequence[str], aus: Sequence[int], path: str,
         *, columns: int = 8) -> np.ndarray:
    """Writes the contact sheet of every row of `batch` to the PNG `path`.

    Returns:
      The sheet, uint8 RGB (layout of `tiles.draw_sheet`, zoom `zoom_for(H)`).
    """
    pixels = to_display(batch[schema.IMAGE])
    captions = [tile_caption(batch, row, source_names, aus) for row in range(len(pixels))]
    return tiles.draw_sheet(list(pixels), captions, path, columns=columns,
                            zoom=zoom_for(pixels.shape[1]), min_width=TILE_WIDTH,
                            min_text_lines=TEXT_LINES)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.contact_sheet",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True,
                        help="experiment config FILE[:VARIANT], e.g. configs/synthetic.py:tiny")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--split", default="train", choices=SPLITS,
                        help="train: the augmented mixture training consumes; validation/test: "
                             "the evaluation batches")
    parser.add_argument("--n", type=int, default=48, help="number of examples (>= 1)")
    parser.add_argument("--seed", type=int, default=None,
                        help="overrides config.seed (train order and augmentation; evaluation "
                             "splits do not depend on it)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    # A broken config is a usage error: one line naming the flag, not a traceback.
    try:
        config = config_files.load(args.config)
    except UserError as error:
        parser.error(str(error))
    if args.seed is not None:
        config.seed = args.seed   # the config is locked; existing fields can still be set
    try:
        batch = first_examples(config, args.split, args.n)
    except ValueError as error:   # the pipeline rejects the config (weights, batch size, split)
        parser.error(f"--config {args.config} --split {args.split}: {error}")
    if not batch or not len(batch[schema.SOURCE]):
        parser.error(f"--split {args.split}: {args.config} has no {args.split} examples")
    try:
        sheet = draw(batch, pipeline.source_names(config.data), config.data.aus, args.out)
    except OSError as error:
        parser.error(f"--out: {error}")
    print(f"wrote {args.out}: {len(batch[schema.SOURCE])} {args.split} examples, "
          f"{sheet.shape[1]}x{sheet.shape[0]} px")


if __name__ == "__main__":
    main()
