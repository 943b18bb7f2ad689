"""A TFDS builder of any dataset source's faces, and the folder each preparation goes to.

  builder = make_builder("affwild2", data_dir, {"task": "va"})
  builder.download_and_prepare(file_format="array_record", download_config=(
      tfds.download.DownloadConfig(manual_dir="/data/Aff-Wild2")))

`builder_class(dataset)` is a `GeneratorBasedBuilder` named `<dataset>_faces` whose manual_dir is
the dataset's folder as its publisher ships it. It reads that folder as
`data_pipelines.sources.get_source` does (`sources.formats.open_folder`) and writes the splits
train, validation and test: one example per record, the face exactly as the source serves it
(already cropped and aligned; PNG, so lossless) and its labels, AUs over the 17 of
`taxonomy.AUS`. With the option `image_size=N` (N > 0) the face is instead stored resized to
N x N, exactly as the input pipeline's `ResizeImage(N)` would resize it, as raw uint8 pixels: a
reader at that training size then does no decoding and no resizing (the format for feeding
accelerators; larger on disk; its record files are kept uncompressed, `store_uncompressed`). An
image that cannot be decoded is skipped and counted ("unreadable image", with its file), or with
`strict` stops the preparation. A split with no
usable record (a small dataset whose seeded split puts none of its subjects in validation, say)
is not written: the others are, and its counts in the metadata (0 records) say why it is empty
(`empty_reason`); reading it raises an error saying so. A dataset with no usable record in any
split is an error, and so is a split whose every image is unreadable.

The options of a preparation (the dataset's own options, see `formats.reader_options`,
`margin` and `image_size`) are its builder config, so a preparation lies in

  <data_dir>/<dataset>_faces/<config name>/<FORMAT_VERSION>/

The config name is the options that differ from their defaults (`task-va`, or `default` when
none does) and a hash of every option with its value, defaults included (`task-va-1f3e5a7c90`):
other options go to another folder, the same options, given or left at their defaults, always to
the same one. (`image_size` enters the hash only when it is not 0, so that the preparations
written before the option existed keep their folder.)

Besides the TFDS files, a preparation holds:

  metadata.json       (`info.metadata`) the dataset, its options, the dataset folder read, and
                      per split the records written, the records skipped per reason, the
                      first places skipped for each reason, the records left out by label
                      policy and the records kept with a caveat (`Skips.note`) per reason
                      (a split with 0 records has no record files: it was left empty)
  labels-<split>.npz  every record's labels as columns (expression, au, va, compound, key), for
                      label statistics and class balancing without decoding any image

Examples are written in the source's order (TFDS shuffling is disabled): record i of a prepared
split is the i-th readable record of the source's split.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import io
import json
import logging
import math
import os
import re
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
import tqdm
from PIL import Image

from data_pipelines import schema, transforms
from data_pipelines.sources import base, formats

log = logging.getLogger("fbnet.data")

FORMAT_VERSION = "1.0.0"
SPLITS = ("train", "validation", "test")
UNREADABLE_IMAGE = "unreadable image"
# The files a complete preparation holds besides its record files.
PREPARED_FILES = ("dataset_info.json", "features.json", "metadata.json")
MARGIN_DEFAULT = inspect.signature(formats.open_folder).parameters["margin"].default
# The preparation options that are not the dataset's own: `margin` (as the sources take it) and
# `image_size` (0: the face as served, PNG; N > 0: resized to N x N, raw uint8).
PREPARATION_DEFAULTS = {"margin": MARGIN_DEFAULT, "image_size": 0}
_LABEL_LENGTH = 60  # characters of the readable part of a config name
_UNSAFE = re.compile(r"[^A-Za-z0-9.\-]+")


def builder_name(dataset: str) -> str:
    """The TFDS name of `dataset`'s builder (the first folder level under data_dir)."""
    return f"{dataset}_faces"


def default_options(dataset: str) -> dict[str, Any]:
    """The options of a preparation of `dataset` with their defaults: the dataset's own options,
    `margin` and `image_size`.

    Raises:
      DatasetError: an unknown dataset.
    """
    return {**formats.reader_options(dataset), **PREPARATION_DEFAULTS}


def resolve_options(dataset: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of a preparation of `dataset`, sorted by name: `options` over the defaults.

    An int given for an option whose default is a float becomes a float, so that `margin=0` and
    `margin=0.0` are the same preparation.

    Raises:
      DatasetError: an unknown dataset or option (the message lists the dataset's options), a
        margin that is not a number >= 0, an image_size that is not an int >= 0, or a value
        that JSON cannot hold.
    """
    defaults = default_options(dataset)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        listed = ", ".join(f"{k} (default {v!r})" for k, v in defaults.items())
        raise base.DatasetError(f"{dataset}: unknown option(s) {', '.join(unknown)}; its "
                                f"options: {listed}")
    resolved = {}
    for key in sorted(defaults):
        value = options.get(key, defaults[key])
        if (isinstance(defaults[key], float) and isinstance(value, int)
                and not isinstance(value, bool)):
            value = float(value)
        resolved[key] = value
    margin = resolved["margin"]
    if (isinstance(margin, bool) or not isinstance(margin, (int, float))
            or not (math.isfinite(margin) and margin >= 0)):
        raise base.DatasetError(f"{dataset}: option margin must be a number >= 0, got "
                                f"{margin!r}")
    size = resolved["image_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise base.DatasetError(f"{dataset}: option image_size must be an int >= 0 (0: faces as "
                                f"served, stored as PNG), got {size!r}")
    try:
        json.dumps(resolved, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise base.DatasetError(f"{dataset}: option values must be numbers, strings, booleans, "
                                f"None or lists of them ({e})") from None
    return resolved


def config_name(dataset: str, options: dict[str, Any]) -> str:
    """The builder config name of a preparation of `dataset` with `options` (see the module
    docstring); made of the characters TFDS allows in config names."""
    resolved = resolve_options(dataset, options)
    defaults = resolve_options(dataset, {})
    changed = "+".join(f"{key}-{_slug(value)}" for key, value in resolved.items()
                       if value != defaults[key])
    hashed = {k: v for k, v in resolved.items() if not (k == "image_size" and v == 0)}
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:10]
    return f"{changed[:_LABEL_LENGTH] or 'default'}-{digest}"


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return _UNSAFE.sub("_", text) or "_"


def prepared_dir(data_dir: str | os.PathLike, dataset: str, options: dict[str, Any]) -> Path:
    """The folder of the preparation of `dataset` with `options` under `data_dir` (TFDS's
    `<data_dir>/<name>/<config>/<version>`); it need not exist."""
    return (Path(data_dir) / builder_name(dataset) / config_name(dataset, options)
            / FORMAT_VERSION)


def is_prepared(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a complete preparation (TFDS writes it whole or not at all)."""
    return all((Path(directory) / name).is_file() for name in PREPARED_FILES)


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The metadata a preparation stored (see the module docstring)."""
    return dict(tfds.builder_from_directory(os.fspath(directory)).info.metadata)


def labels_file(split: str) -> str:
    """The name of the file holding `split`'s label columns in a preparation."""
    return f"labels-{split}.npz"


# The record files of a raw uint8 preparation are stored uncompressed: TFDS writes array_record
# with zstd (level 3), whose decompression is most of the cost of reading a 112 px face (about
# 3x the time of an uncompressed read, for about 1.6x the bytes on disk).
UNCOMPRESSED = "group_size:1,uncompressed"
TFDS_WRITES = "group_size:1"  # the options TFDS 4.9.10 writes array_record with (zstd's default)
_COPY_RECORDS = 1024  # records per read while rewriting a record file


def record_files(directory: str | os.PathLike) -> list[Path]:
    """The array_record files of a preparation, every split's shards."""
    return sorted(Path(directory).glob("*.array_record-*-of-*"))


def is_compressed(path: str | os.PathLike) -> bool:
    """Whether an array_record file's records were written compressed (its header says)."""
    reader = array_record_module.ArrayRecordReader(os.fspath(path))
    try:
        options = reader.writer_options_string().split(",")
    finally:
        reader.close()
    return "uncompressed" not in options


def store_uncompressed(directory: str | os.PathLike) -> int:
    """Rewrites every compressed record file of a preparation uncompressed, in place; returns how
    many it rewrote (0 when none was compressed). A file that cannot be read is a `DatasetError`.

    The records, their order and TFDS's metadata stay the same. Each file is written beside the
    old one and renamed over it, so a rewrite that stops half-way leaves every file whole (a
    file still compressed reads as well, only slower, and the next `fbnet prepare` of the same
    options rewrites it).
    """
    path, compressed = None, []
    try:
        for path in record_files(directory):
            if is_compressed(path):
                compressed.append(path)
        if compressed:
            log.info("%s: rewriting %d record file(s) uncompressed", directory, len(compressed))
        for path in compressed:
            rewrite_records(path, UNCOMPRESSED)
    except RuntimeError as e:  # array_record's error for a damaged file
        found = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise base.DatasetError(f"{path}: cannot be read: {found}; the preparation is damaged: "
                                f"delete {directory} and prepare it again") from e
    return len(compressed)


def rewrite_records(path: str | os.PathLike, options: str) -> None:
    """Writes an array_record file's records again, in order, with writer `options`; the new file
    is written beside it and renamed over it."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    reader = array_record_module.ArrayRecordReader(os.fspath(path))
    try:
        writer = array_record_module.ArrayRecordWriter(os.fspath(temporary), options)
        try:
            total = reader.num_records()
            for start in range(0, total, _COPY_RECORDS):
                for record in reader.read(start, min(total, start + _COPY_RECORDS)):
                    writer.write(record)
        finally:
            writer.close()
        os.replace(temporary, path)
    finally:
        reader.close()
        temporary.unlink(missing_ok=True)


def features(image_size: int = 0) -> tfds.features.FeaturesDict:
    """The features of a prepared example: the image as PNG (`image_size` 0) or as raw uint8
    [image_size, image_size, 3] bytes."""
    if image_size:
        image = tfds.features.Tensor(shape=(image_size, image_size, 3), dtype=np.uint8,
                                     encoding=tfds.features.Encoding.BYTES)
    else:
        image = tfds.features.Image(shape=(None, None, 3), encoding_format="png")
    return tfds.features.FeaturesDict({
        "image": image,
        "expression": tfds.features.Scalar(np.int32),
        "au": tfds.features.Tensor(shape=(base.NUM_AUS,), dtype=np.int8),
        "va": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        "compound": tfds.features.Scalar(np.int32),
        "key": tfds.features.Text(),
        "group": tfds.features.Text(),
    })


def _png(image: np.ndarray) -> bytes:
    # Encoded here: tfds encodes numpy images with TensorFlow, which is not installed.
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclasses.dataclass(eq=False)
class FacesConfig(tfds.core.BuilderConfig):
    """A preparation's builder config; `options` holds every option with its value."""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def make_config(dataset: str, options: dict[str, Any]) -> FacesConfig:
    """The builder config of a preparation of `dataset` with `options`."""
    resolved = resolve_options(dataset, options)
    return FacesConfig(name=config_name(dataset, resolved), version=FORMAT_VERSION,
                       description=f"{dataset} prepared with options "
                                   f"{json.dumps(resolved, sort_keys=True)}",
                       options=resolved)


class FacesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The faces of dataset `DATASET` as its source serves them; `builder_class` makes one
    subclass per dataset. Not registered with TFDS: read a preparation with
    `tfds.builder_from_directory` (or `data_pipelines.sources.prepared`)."""

    VERSION = tfds.core.Version(FORMAT_VERSION)
    RELEASE_NOTES = {FORMAT_VERSION: "Faces as data_pipelines.sources serves them (PNG), labels "
                                     "over the 17 AUs of fbnet_jax.core.taxonomy.AUS."}
    DATASET = ""
    # Where TFDS looks for a checksums file (nothing is downloaded). TFDS's own lookup of a
    # builder's module fails without the `importlib_resources` package.
    code_path = None

    def __init__(self, *, config: FacesConfig, strict: bool = False, **kwargs: Any):
        """See `tfds.core.DatasetBuilder`; `strict` stops at the first record that cannot be
        prepared instead of skipping and counting it."""
        self._strict = strict
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        options = dict(self.builder_config.options)
        return tfds.core.DatasetInfo(
            builder=self,
            description=(f"The faces of {self.DATASET} as data_pipelines.sources.get_source "
                         f"serves them (cropped and aligned) with their labels."),
            features=features(options["image_size"]),
            metadata=tfds.core.MetadataDict(dataset=self.DATASET, options=options),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager
                          ) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
        """Reads the labels of every split first (so with `strict` a bad label anywhere stops
        the preparation before any image is decoded): a split with no record gets no generator
        (TFDS cannot write an empty split), only its counts in the metadata, which say why it
        is empty, so that a small dataset whose split leaves one empty is still prepared."""
        root = Path(os.fspath(dl_manager.manual_dir))
        self.info.metadata["manual_dir"] = os.path.abspath(root)
        options = dict(self.builder_config.options)
        margin = options.pop("margin")
        options.pop("image_size")
        split_sources = {
            split: formats.open_folder(self.DATASET, root, split, unreadable="raise",
                                       strict=self._strict, margin=margin, allow_empty=True,
                                       **options)
            for split in SPLITS}
        sizes = {split: len(source) for split, source in split_sources.items()}
        if not any(sizes.values()):
            raise base.DatasetError(
                f"{self.DATASET}: no usable record in any split under {root} ("
                + "; ".join(source.skips.summary() for source in split_sources.values()) + ")")
        generators = {}
        for split, source in split_sources.items():
            if sizes[split]:
                generators[split] = self._generate_examples(source, split)
            else:  # its counts say why it is empty (`empty_reason`)
                self._store_counts(split, source, written=0)
        return generators

    def _store_counts(self, split: str, source: base.FileSource, written: int) -> None:
        """The split's records written, skipped, left out and noted, in the metadata."""
        metadata = self.info.metadata
        metadata.setdefault("records", {})[split] = written
        metadata.setdefault("skipped", {})[split] = dict(source.skips.counts)
        metadata.setdefault("dropped", {})[split] = dict(source.skips.dropped)
        metadata.setdefault("noted", {})[split] = dict(source.skips.noted)
        metadata.setdefault("first_skipped", {})[split] = {
            reason: list(places) for reason, places in source.skips.first.items()}

    def _generate_examples(self, source: base.FileSource, split: str
                           ) -> Iterator[tuple[str, dict[str, Any]]]:
        size = self.builder_config.options["image_size"]
        resize = transforms.ResizeImage(size) if size else None
        n = len(source)
        expression = np.full(n, -1, np.int32)
        au = np.full((n, base.NUM_AUS), -1, np.int8)
        va = np.full((n, 2), np.nan, np.float32)
        compound = np.full(n, -1, np.int32)
        keys: list[bytes] = []
        with tqdm.tqdm(total=n, desc=f"{self.DATASET} [{split}]", unit=" faces",
                       mininterval=1.0) as bar:
            for index in range(n):
                try:
                    record = source[index]
                except base.DatasetError as e:
                    where = source._where(index)  # pylint: disable=protected-access
                    source.skips.skip(UNREADABLE_IMAGE, where,
                                      str(e).removeprefix(f"{where}: "))
                    continue
                finally:
                    bar.update()
                row = len(keys)
                expression[row], au[row] = record["expression"], record["au"]
                va[row], compound[row] = record["va"], record["compound"]
                keys.append(record["key"].encode())
                image = record["image"]
                if resize is None:
                    image = _png(image)
                else:
                    image = np.ascontiguousarray(
                        resize.map({schema.IMAGE: image})[schema.IMAGE], np.uint8)
                yield record["key"], {
                    "image": image, "expression": record["expression"],
                    "au": record["au"], "va": record["va"], "compound": record["compound"],
                    "key": record["key"], "group": str(source.groups[index])}
        written = len(keys)
        if not written:
            # TFDS would stop with "No examples were yielded"; say which images instead.
            raise base.DatasetError(
                f"{self.DATASET}: none of the {n} images of split {split!r} could be read "
                f"({source.skips.summary()}); is the dataset complete?")
        self._store_counts(split, source, written)
        np.savez(os.fspath(self.data_path / labels_file(split)), expression=expression[:written],
                 au=au[:written], va=va[:written], compound=compound[:written],
                 key=np.array(keys, dtype=bytes))


def _split_rule(split: str, options: dict[str, Any]) -> str:
    """The options that decide which records fall in `split`, as `key=value` text."""
    if options.get("fold") is not None:
        keys = ("fold",) if split == "test" else ("fold", "validation_fraction", "seed")
    elif split == "test" and "test_fraction" not in options:
        return "the dataset's own test set"
    else:
        keys = {"train": ("validation_fraction", "test_fraction", "seed"),
                "validation": ("validation_fraction", "seed"),
                "test": ("test_fraction", "seed")}[split]
    present = [f"{key}={json.dumps(options[key])}" for key in keys if key in options]
    return "split options " + ", ".join(present) if present else "the dataset's own split"


def empty_reason(metadata: dict[str, Any], split: str) -> str:
    """Why `split` of a preparation (its `metadata`) holds no record, for `fbnet prepare`'s
    summary and the error of reading it: the records the other splits hold, the options that
    split the dataset, and whether rows read for this split were skipped or left out."""
    records = metadata["records"]
    others = [s for s in SPLITS if s != split]
    held = sum(records[s] for s in others)
    where = "; ".join([", ".join(f"{s} {records[s]}" for s in others),
                       _split_rule(split, metadata["options"])])
    if not (metadata["skipped"].get(split) or metadata.get("dropped", {}).get(split)):
        return (f"the split put none of the dataset's {held} prepared record(s) in {split} "
                f"({where})")
    return (f"no usable record is in {split} (the rows read for it were skipped or left out, as "
            f"counted, or the split put none there); the other splits hold {held} ({where})")


@functools.cache
def builder_class(dataset: str) -> type[FacesBuilder]:
    """The builder class of `dataset` (one per dataset, named `builder_name(dataset)`).

    Raises:
      DatasetError: an unknown dataset.
    """
    formats.reader(dataset)
    module = formats.DATASETS[dataset].split(":")[0]
    instructions = (
        f"manual_dir is the {dataset} folder as its publisher ships it (unpacked), read by "
        f"data_pipelines.sources.get_source({dataset!r}, manual_dir, split); the layout it "
        f"expects is in the docstring of data_pipelines/sources/{module}.py.")
    namespace = {"name": builder_name(dataset), "DATASET": dataset, "__module__": __name__,
                 "__doc__": f"The faces of {dataset} (see FacesBuilder).",
                 "MANUAL_DOWNLOAD_INSTRUCTIONS": instructions}
    class_name = "".join(part.capitalize() for part in dataset.split("_")) + "Faces"
    return types.new_class(class_name, (FacesBuilder,), {"skip_registration": True},
                           lambda ns: ns.update(namespace))


def make_builder(dataset: str, data_dir: str | os.PathLike, options: dict[str, Any], *,
                 strict: bool = False) -> FacesBuilder:
    """The builder of the preparation of `dataset` with `options` under `data_dir`."""
    return builder_class(dataset)(data_dir=os.fspath(data_dir),
                                  config=make_config(dataset, options), strict=strict)
