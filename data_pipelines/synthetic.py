"""Procedural faces with exact labels: the embedded default dataset.

Each record is computed on the fly from (spec, split, index), so any process or grain worker gets
the same image and labels and nothing is stored. Labels come first, the way faces work: an
expression (one of the 7 basic ones, or one of RAF-DB's 11 compound classes), the AUs it moves
(drawn from the expression-AU relatedness table), a per-face expression intensity that scales the
AU intensities and the valence/arousal (placed on Russell's circumplex). The image is then drawn
from the AU intensities alone (`synthetic_render`), with nuisances set by a `Style`.

Contact sheet of samples:
  python -m data_pipelines.synthetic --out sheet.png [--n 48] [--seed 0] [--compound] [--size 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import zlib
from collections.abc import Sequence

import grain
import numpy as np

from data_pipelines import schema, tiles
from data_pipelines.synthetic_look import Look, Style, draw_look
from data_pipelines.synthetic_render import RENDERABLE_AUS, paint
from fbnet_jax.core import taxonomy

__all__ = [
    "CIRCUMPLEX",
    "RENDERABLE_AUS",
    "FaceLabels",
    "Look",
    "Style",
    "SyntheticFaces",
    "SyntheticSpec",
    "au_probabilities",
    "contact_sheet",
    "draw_labels",
    "render_face",
]

# (valence, arousal) of each basic expression's prototype, read off Russell's circumplex
# (Russell 1980, "A circumplex model of affect"): approximate placements chosen for this
# synthetic data, not measured values. A face lands at intensity-scaled prototype plus noise.
CIRCUMPLEX: dict[str, tuple[float, float]] = {
    "Neutral": (0.0, 0.0),
    "Anger": (-0.6, 0.65),
    "Disgust": (-0.7, 0.25),
    "Fear": (-0.45, 0.8),
    "Happiness": (0.8, 0.35),
    "Sadness": (-0.7, -0.4),
    "Surprise": (0.25, 0.85),
}

PROTOTYPICAL_RATE = 0.93   # P(active) of an expression's prototypical AUs
BASE_RATE = 0.05           # P(active) of AUs unrelated to the expression (Neutral: every AU)
# P(active) of an AU that no class of the table moves (AU14 in the default list), for every
# class: at BASE_RATE such an AU is too rare for a small model to learn in a short run (AU14
# is frequent in spontaneous data, e.g. BP4D).
FREE_AU_RATE = 0.2
MIN_IMAGE_SIZE = 8         # smallest image side the renderer draws a face at

# The tables the generator can draw AUs from (`SyntheticSpec.au_table`). "du2014" is the table the
# coupling losses assume by default. "swapped" is the same table with these AU columns exchanged:
# a world whose expressions move other AUs than the losses' prior says (Happiness shows AU14
# instead of AU12, Sadness AU5 and AU17 instead of AU4 and AU15, Fear AU2, AU5 and AU23 instead
# of AU1, AU4 and AU20, ...), to measure what a wrong prior does to the couplings.
AU_TABLES = ("du2014", "swapped")
SWAPPED_AU_PAIRS = ((1, 2), (4, 5), (12, 14), (15, 17), (20, 23))
MIN_INTENSITY = 0.35       # active AUs are never fainter, so every active AU stays visible
VA_NOISE = 0.08            # std of the valence/arousal scatter around the prototype


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """One synthetic dataset.

    Attributes:
      num_records: length of the train split.
      seed: generator seed; every split draws its own stream from it.
      image_size: output side S (images are S x S x 3).
      label_expression: the train split publishes the expression (basic, or compound for a
        compound spec).
      label_va: the train split publishes valence/arousal.
      label_aus: AU numbers the train split publishes; None = every AU of the AU list, () = none.
        AUs outside the source's AU list are ignored.
      compound: draw one of RAF-DB's 11 compound classes instead of a basic expression.
      video_frames: > 0: each run of this many consecutive records is one clip (same person,
        background and expression; intensity and pose drift slowly).
      style: nuisance levels.
      au_table: which expression-AU table the AUs are drawn from (AU_TABLES); basic faces only.
    """
    num_records: int
    seed: int = 0
    image_size: int = 64
    label_expression: bool = True
    label_va: bool = True
    label_aus: tuple[int, ...] | None = None
    compound: bool = False
    video_frames: int = 0
    style: Style = dataclasses.field(default_factory=Style)
    au_table: str = "du2014"

    def __post_init__(self):
        # Configs hand over lists; a tuple keeps the spec hashable and its repr stable.
        if self.label_aus is not None:
            object.__setattr__(self, "label_aus", tuple(int(a) for a in self.label_aus))
        if (self.num_records < 0 or self.image_size < MIN_IMAGE_SIZE
                or self.video_frames < 0 or self.au_table not in AU_TABLES
                or (self.compound and self.au_table != "du2014")):
            raise ValueError(f"invalid SyntheticSpec {self}")


@dataclasses.dataclass(frozen=True)
class FaceLabels:
    """The ground truth of one face.

    Attributes:
      expression: 0..6, or -1 for a compound face.
      compound: 0..10 (RAF-DB order), or -1 for a basic face.
      au_intensity: float32 [A] in [0, 1] over the AU list; an AU is active iff > 0.
      va: float32 [2], valence and arousal in [-1, 1].
      intensity: the face's overall expression intensity in [0, 1].
    """
    expression: int
    compound: int
    au_intensity: np.ndarray
    va: np.ndarray
    intensity: float

    @property
    def au_active(self) -> np.ndarray:
        return (self.au_intensity > 0).astype(np.int8)


def au_probabilities(compound: bool = False, aus: Sequence[int] = taxonomy.AUS,
                     au_table: str = "du2014") -> np.ndarray:
    """P(AU active | class): [7 or 11, A] from the relatedness table projected on `aus`.

    Prototypical AUs get PROTOTYPICAL_RATE, observational ones their table weight (the fraction of
    subjects who showed them), all others BASE_RATE (so Neutral is BASE_RATE everywhere), except
    AUs that no class moves, which get FREE_AU_RATE everywhere. `au_table` picks the basic table
    (AU_TABLES). Read-only.
    """
    return _au_probabilities(bool(compound), tuple(aus), au_table)


@functools.lru_cache(maxsize=32)
def _au_probabilities(compound: bool, aus: tuple[int, ...], au_table: str) -> np.ndarray:
    weights = relatedness_table(compound, aus, au_table)
    probs = np.where(weights >= 1.0, PROTOTYPICAL_RATE, np.maximum(weights, BASE_RATE))
    probs[:, ~(weights > 0).any(axis=0)] = FREE_AU_RATE
    probs.setflags(write=False)
    return probs


@functools.lru_cache(maxsize=32)
def relatedness_table(compound: bool, aus: tuple[int, ...], au_table: str = "du2014"
                      ) -> np.ndarray:
    """The class-AU table the generator draws from, projected on `aus` (read-only)."""
    if au_table not in AU_TABLES:
        raise ValueError(f"unknown au_table {au_table!r}; known: {AU_TABLES}")
    if compound:
        weights = taxonomy.compound_relatedness(aus=aus)
    else:
        all_aus = tuple(taxonomy.AU_NAMES)  # swap on the full AU set, then project
        full = taxonomy.basic_relatedness(all_aus)
        if au_table == "swapped":
            column = {au: i for i, au in enumerate(all_aus)}
            for a, b in SWAPPED_AU_PAIRS:
                full[:, [column[a], column[b]]] = full[:, [column[b], column[a]]]
        weights = full[:, [all_aus.index(au) for au in aus]]
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=4)
def _class_va(compound: bool) -> np.ndarray:
    """[K, 2] prototype VA per class; a compound sits at the mean of its two components."""
    basic = np.array([CIRCUMPLEX[name] for name in taxonomy.EXPRESSIONS], np.float32)
    if not compound:
        return basic
    return basic[taxonomy.compound_components()].mean(axis=1)


def draw_labels(rng: np.random.Generator, *, compound: bool = False,
                aus: Sequence[int] = taxonomy.AUS, au_table: str = "du2014") -> FaceLabels:
    """Draws the labels of one face.

    Args:
      rng: the face's generator (advanced by a fixed number of draws).
      compound: draw a compound class (uniform over RAF-DB's 11) instead of a basic expression.
      aus: the AU list.
      au_table: the basic expression-AU table the AUs are drawn from (AU_TABLES).

    Returns:
      FaceLabels; active AUs have intensity MIN_INTENSITY..1, growing with the face's intensity.
    """
    aus = tuple(aus)
    probs = au_probabilities(compound, aus, au_table)
    k = int(rng.integers(probs.shape[0]))
    intensity = float(rng.uniform(0.3, 1.0))
    u = rng.uniform(size=(2, len(aus)))
    active = u[0] < probs[k]
    related = relatedness_table(compound, aus, au_table)[k] > 0
    # Related AUs follow the face's intensity; unrelated ones (stray movements) do not.
    strength = np.where(related, intensity * (0.6 + 0.4 * u[1]), u[1])
    au_intensity = np.where(active, MIN_INTENSITY + (1 - MIN_INTENSITY) * strength, 0.0)
    va = _class_va(compound)[k] * (0.3 + 0.7 * intensity) + VA_NOISE * rng.standard_normal(2)
    return FaceLabels(
        expression=-1 if compound else k, compound=k if compound else -1,
        au_intensity=au_intensity.astype(np.float32),
        va=np.clip(va, -1.0, 1.0).astype(np.float32), intensity=intensity)


def render_face(rng: np.random.Generator, au_intensity: Sequence[float], spec: SyntheticSpec,
                aus: Sequence[int] = taxonomy.AUS) -> np.ndarray:
    """Draws a person and a scene from `rng` (never from the AUs) and renders the AUs on them.

    The same rng state with different AU intensities gives the same person, pose and scene.

    Returns:
      uint8 [S, S, 3] RGB, S = spec.image_size.
    """
    if len(au_intensity) != len(aus):
        raise ValueError(f"{len(au_intensity)} AU intensities for an AU list of {len(aus)}")
    look = draw_look(rng, spec.style, spec.image_size)
    return paint(look, dict(zip(aus, au_intensity)), spec.image_size, spec.style.tint)


def _split_id(split: str) -> int:
    # A stable hash (Python's hash() is salted per process).
    return zlib.crc32(split.encode("utf-8"))


class SyntheticFaces(grain.sources.RandomAccessDataSource):
    """A grain source of schema records, each computed from (spec, split, index).

    Args:
      spec: the dataset.
      split: "train" publishes labels as the spec says; any other split (validation, test, ...)
        is an independent stream with every label published.
      num_records: length override (for evaluation splits); default spec.num_records.
      aus: the AU list of the records.
      source_index: the `source` field.
      name: prefix of the record keys, f"{name}/{split}/{index:07d}".
      cache: keep every record rendered in memory and serve it again from there (a record is
        rendered once per process instead of once per epoch; the same records either way).
        Costs about S * S * 3 bytes a record; cached images are read-only. Each grain worker
        process starts with an empty cache of its own.
    """

    def __init__(self, spec: SyntheticSpec, *, split: str = "train",
                 num_records: int | None = None, aus: Sequence[int] = taxonomy.AUS,
                 source_index: int = 0, name: str = "synthetic", cache: bool = False):
        self.spec = spec
        self.cache = bool(cache)
        self._cached: dict[int, schema.Record] = {}
        self.split = split
        self.aus = taxonomy.check_au_list(aus)
        unknown = sorted(set(self.aus) - set(RENDERABLE_AUS))
        if unknown:
            raise ValueError(f"synthetic faces cannot show AUs {unknown}")
        self.num_records = spec.num_records if num_records is None else int(num_records)
        self.source_index = int(source_index)
        self.name = name
        self._stream = (spec.seed, _split_id(split))
        full = split != "train"
        self._publish_class = full or spec.label_expression
        self._publish_va = full or spec.label_va
        if full or spec.label_aus is None:
            self._au_published = np.ones(len(self.aus), bool)
        else:
            self._au_published = np.isin(self.aus, spec.label_aus)

    def __len__(self) -> int:
        return self.num_records

    def __getstate__(self) -> dict:
        # Worker processes get the source without the records cached here.
        return {**self.__dict__, "_cached": {}}

    def __repr__(self) -> str:
        # grain's DataLoader checkpoints compare sources by repr.
        return (f"SyntheticFaces(spec={self.spec!r}, split={self.split!r}, "
                f"num_records={self.num_records}, aus={self.aus}, "
                f"source_index={self.source_index}, name={self.name!r})")

    def key(self, index: int) -> str:
        """The `key` of record `index`."""
        return f"{self.name}/{self.split}/{index:07d}"

    def labels_and_look(self, index: int) -> tuple[FaceLabels, Look]:
        """The ground truth and the scene of record `index`, before rendering."""
        if self.spec.video_frames:
            return self._frame(index)
        rng = np.random.default_rng((*self._stream, 0, index))
        labels = draw_labels(rng, compound=self.spec.compound, aus=self.aus,
                             au_table=self.spec.au_table)
        return labels, draw_look(rng, self.spec.style, self.spec.image_size)

    def _frame(self, index: int) -> tuple[FaceLabels, Look]:
        """Frame `index` of its clip: the clip's person, scene and expression, with the
        expression intensity, valence/arousal and pose drifting smoothly over the frames."""
        frames, style = self.spec.video_frames, self.spec.style
        clip, t = divmod(index, frames)
        rng = np.random.default_rng((*self._stream, 1, clip))
        labels = draw_labels(rng, compound=self.spec.compound, aus=self.aus,
                             au_table=self.spec.au_table)
        look = draw_look(rng, style, self.spec.image_size)
        period, phase, other_phase = rng.uniform(size=3) * (2 * frames, 2 * math.pi, 2 * math.pi)
        angle = 2 * math.pi * t / (frames + period)          # slower than one cycle per clip
        wave, swing = math.sin(angle + phase), math.sin(angle + other_phase)
        envelope = 0.65 + 0.35 * wave                       # 0.3 .. 1 of the clip's intensities
        au = np.where(labels.au_intensity > 0,
                      MIN_INTENSITY + (labels.au_intensity - MIN_INTENSITY) * envelope, 0.0)
        va = np.clip(labels.va * (0.75 + 0.25 * wave) + 0.03 * swing, -1.0, 1.0)
        labels = dataclasses.replace(labels, au_intensity=au.astype(np.float32),
                                     va=va.astype(np.float32),
                                     intensity=labels.intensity * envelope)
        drift = style.pose * self.spec.image_size
        look = dataclasses.replace(
            look, roll=look.roll + 0.05 * style.pose * swing,
            shift=(look.shift[0] + 0.02 * drift * wave, look.shift[1] + 0.015 * drift * swing),
            # Fresh sensor noise in every frame.
            noise_at=(look.noise_at[0] + 7919 * t, look.noise_at[1] + 104729 * t))
        return labels, look

    def __getitem__(self, index: int) -> schema.Record:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"index {index} outside 0..{self.num_records - 1}")
        if not self.cache:
            return self._render(index)
        record = self._cached.get(index)
        if record is None:
            record = self._render(index)
            for value in record.values():
                if isinstance(value, np.ndarray):
                    value.setflags(write=False)
            self._cached[index] = record
        return dict(record)

    def _render(self, index: int) -> schema.Record:
        labels, look = self.labels_and_look(index)
        au_map = dict(zip(self.aus, labels.au_intensity.tolist()))
        image = paint(look, au_map, self.spec.image_size, self.spec.style.tint)
        au = np.where(self._au_published, labels.au_active, schema.MISSING_AU)
        return schema.make_record(
            image, key=self.key(index), source=self.source_index,
            expression=(labels.expression if self._publish_class and labels.expression >= 0
                        else None),
            compound=labels.compound if self._publish_class and labels.compound >= 0 else None,
            au=au, va=labels.va if self._publish_va else None, num_aus=len(self.aus))


# --------------------------------------------------------------------------------------------
# Contact sheet.

_SHORT_COMPOUND = {name: "".join(w[:3] for w in name.split()) for name in
                   taxonomy.RAF_COMPOUND_CLASSES}   # "Happily Surprised" -> "HapSur"


def _caption(record: schema.Record, aus: Sequence[int]) -> list[str]:
    """Label lines under a tile: class, active AUs (labelled ones only), V/A."""
    expression, compound = int(record[schema.EXPRESSION]), int(record[schema.COMPOUND])
    if expression >= 0:
        lines = [taxonomy.EXPRESSIONS[expression]]
    elif compound >= 0:
        lines = [_SHORT_COMPOUND[taxonomy.RAF_COMPOUND_CLASSES[compound]]]
    else:
        lines = ["-"]
    au = np.asarray(record[schema.AU])
    active = [str(a) for a, v in zip(aus, au) if v == 1]
    if not (au >= 0).any():
        words = ["AU ?"]  # no AU labelled
    else:
        words = ["AU"] + (active or ["none"])
    while words:   # wrap the AU list in lines of at most 6 numbers
        lines.append(" ".join(words[:6]))
        words = words[6:]
    va = np.asarray(record[schema.VA])
    lines.append("V/A ?" if np.isnan(va).any() else f"V{va[0]:+.2f} A{va[1]:+.2f}")
    return lines


def contact_sheet(source: SyntheticFaces, indices: Sequence[int], path: str, *,
                  columns: int = 8, zoom: int = 2) -> np.ndarray:
    """Writes a PNG grid of records, each tile zoomed and captioned with its labels.

    Returns:
      the sheet, uint8 RGB.
    """
    records = [source[index] for index in indices]
    return tiles.draw_sheet([record[schema.IMAGE] for record in records],
                            [_caption(record, source.aus) for record in records], path,
                            columns=columns, zoom=zoom)


# The command's --size range: the generator needs 8 px for a face; above 1024 px a sheet of a few
# dozen tiles runs to hundreds of megapixels, which is no longer a preview.
_SIZE_RANGE = (MIN_IMAGE_SIZE, 1024)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.synthetic",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--n", type=int, default=48, help="number of samples (>= 1)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--compound", action="store_true", help="compound classes")
    parser.add_argument("--size", type=int, default=64,
                        help="image side, %d..%d" % _SIZE_RANGE)
    parser.add_argument("--split", default="train", help="split to draw from")
    parser.add_argument("--video-frames", type=int, default=0,
                        help="frames per clip (0: independent faces)")
    args = parser.parse_args(argv)
    # Checked here, so a bad value is a usage error naming its flag rather than a traceback
    # from deep in the generator or the sheet drawing.
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    if not _SIZE_RANGE[0] <= args.size <= _SIZE_RANGE[1]:
        parser.error(f"--size must lie in {_SIZE_RANGE[0]}..{_SIZE_RANGE[1]}, got {args.size}")
    if args.video_frames < 0:
        parser.error(f"--video-frames must be 0 or more, got {args.video_frames}")
    spec = SyntheticSpec(num_records=args.n, seed=args.seed, image_size=args.size,
                         compound=args.compound, video_frames=args.video_frames)
    contact_sheet(SyntheticFaces(spec, split=args.split), range(args.n), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
