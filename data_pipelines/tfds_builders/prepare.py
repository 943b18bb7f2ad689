"""`fbnet prepare`: a dataset's faces written once as TFDS array_record, read without TensorFlow.

  fbnet prepare --dataset NAME --manual_dir DIR --data_dir DIR [--option KEY=VALUE ...] [--strict]

reads dataset NAME from DIR (its folder as the publisher ships it) with
`data_pipelines.sources.get_source`, decodes every image once (so every unreadable one is found
up front) and writes the splits train, validation and test under --data_dir, in a folder of
their own for each set of options (see data_pipelines.tfds_builders.faces). A split that no
usable record falls in (a small dataset's seeded split may leave one empty) is not written; the
summary says which and why, and reading it raises an error saying so. Then
`get_source("prepared", DATA_DIR, split, dataset=NAME, **options)` serves the same records.

Options are the dataset's own (`data_pipelines.sources.reader_options`), `margin` and
`image_size` (N > 0: faces stored resized to N x N as raw uint8, see
data_pipelines.tfds_builders.faces); VALUE is
read as a Python literal (0.3, True, 'va') where it is one, else as a string (va). Records that
cannot be used are skipped and counted per reason, or with --strict the first stops the
preparation (nothing is written). A preparation is written whole or not at all; when it exists,
the command writes nothing and prints what it stored.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import logging
import os
import shlex
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from data_pipelines.sources.base import DatasetError
from data_pipelines.tfds_builders import faces


def parse_option_value(text: str) -> Any:
    """The value of `--option KEY=TEXT`: the Python literal TEXT is, or else TEXT itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def option_text(value: Any) -> str:
    """How `value` is written in `--option KEY=VALUE` (`parse_option_value` reads it back)."""
    if isinstance(value, str) and parse_option_value(value) == value:
        return value
    return repr(value)


def _known_options(dataset: str) -> str:
    return ", ".join(f"{k} (default {option_text(v)})"
                     for k, v in faces.default_options(dataset).items())


def parse_options(dataset: str, option_strings: Sequence[str]) -> dict[str, Any]:
    """The options given as `KEY=VALUE` strings.

    Raises:
      DatasetError: a string without `=`, a key given twice, or an option `dataset` does not
        have (each message is one line and lists the dataset's options).
    """
    options: dict[str, Any] = {}
    for text in option_strings:
        key, equals, value = text.partition("=")
        key = key.strip()
        if not equals or not key:
            raise DatasetError(f"--option expects KEY=VALUE, got {text!r}; {dataset}'s options: "
                               f"{_known_options(dataset)}")
        if key in options:
            raise DatasetError(f"--option {key} is given twice")
        options[key] = parse_option_value(value)
    faces.resolve_options(dataset, options)
    return options


def prepare_command(data_dir: str | os.PathLike, dataset: str, options: dict[str, Any]) -> str:
    """The `fbnet prepare` command that writes the preparation of `dataset` with `options`."""
    words = ["fbnet", "prepare", "--dataset", dataset, "--manual_dir", f"<the {dataset} folder>",
             "--data_dir", os.fspath(data_dir)]
    for key, value in sorted(options.items()):
        words += ["--option", f"{key}={option_text(value)}"]
    return shlex.join(words)


@dataclasses.dataclass
class Summary:
    """What a preparation holds: `written` is whether this call wrote it (else it existed).

    `records` is the records written per split, `skipped` the records skipped per split and
    reason, `dropped` those left out by label policy and `noted` those kept with a caveat
    (`base.Skips.note`), per split and reason. A split with 0 records was not written; the
    summary says why (`faces.empty_reason`).
    """
    dataset: str
    directory: str
    options: dict[str, Any]
    written: bool
    records: dict[str, int]
    skipped: dict[str, dict[str, int]]
    dropped: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    noted: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    rewritten: int = 0  # record files of an earlier raw uint8 preparation stored uncompressed now

    def _metadata(self) -> dict[str, Any]:
        """The counts as a preparation's metadata holds them (for `faces.empty_reason`)."""
        return {"options": self.options, "records": self.records, "skipped": self.skipped,
                "dropped": self.dropped}

    def lines(self) -> list[str]:
        """The summary as `fbnet prepare` prints it."""
        if self.written:
            head = f"{self.dataset}: prepared in {self.directory}"
        elif self.rewritten:
            head = (f"{self.dataset}: already prepared in {self.directory}; its "
                    f"{self.rewritten} record file(s) rewritten uncompressed (read faster)")
        else:
            head = f"{self.dataset}: already prepared in {self.directory}; nothing written"
        options = ", ".join(f"{k}={option_text(v)}" for k, v in sorted(self.options.items()))
        lines = [head, f"  options: {options}"]
        for split in faces.SPLITS:
            skipped = sorted(self.skipped[split].items(), key=lambda item: (-item[1], item[0]))
            line = (f"  {split}: {self.records[split]} record(s) written, "
                    f"{sum(n for _, n in skipped)} skipped")
            if skipped:
                line += " (" + "; ".join(f"{n} {reason}" for reason, n in skipped) + ")"
            dropped = sorted(self.dropped.get(split, {}).items(),
                             key=lambda item: (-item[1], item[0]))
            if dropped:
                line += "; left out by label policy: " + ", ".join(
                    f"{n} {reason}" for reason, n in dropped)
            noted = sorted(self.noted.get(split, {}).items(),
                           key=lambda item: (-item[1], item[0]))
            if noted:
                line += "; noted: " + ", ".join(f"{n} {reason}" for reason, n in noted)
            if not self.records[split]:
                line += "; empty: " + faces.empty_reason(self._metadata(), split)
            lines.append(line)
        empty = [split for split in faces.SPLITS if not self.records[split]]
        if empty:
            one = len(empty) == 1
            lines.append(f"  {' and '.join(empty)} {'is' if one else 'are'} empty: a run cannot "
                         f"train or evaluate on {'it' if one else 'them'} (reading "
                         f"{'it' if one else 'them'} is an error); other split options may "
                         f"fill {'it' if one else 'them'}")
        return lines


@contextlib.contextmanager
def _tfds_quiet() -> Iterator[None]:
    """TFDS's own output off: its bars have no total (so no ETA; the builder shows one bar per
    split instead), it prints "Downloading and preparing ..." lines on stdout, and it warns
    "Using custom data configuration" for every builder given its config; `fbnet prepare`
    prints its own summary."""
    tfds.display_progress_bar(False)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logger.setLevel(level)
        tfds.display_progress_bar(True)


def prepare(dataset: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
            options: dict[str, Any], *, strict: bool = False) -> Summary:
    """Writes the preparation of `dataset` (read from `manual_dir`) with `options` under
    `data_dir`, unless it exists; returns what it holds.

    Raises:
      DatasetError: an unknown dataset or option, a `manual_dir` that is not a folder with
        files, a folder left incomplete, or a dataset that cannot be read (see `get_source`).
      BadRecordError: with `strict`, the first record that cannot be prepared (nothing is
        written).
    """
    resolved = faces.resolve_options(dataset, options)
    directory = faces.prepared_dir(data_dir, dataset, resolved)
    written = not directory.exists()
    if not written and not faces.is_prepared(directory):
        raise DatasetError(f"{directory} exists but is not a complete preparation (it needs "
                           f"{', '.join(faces.PREPARED_FILES)}); delete it and prepare again")
    if written:
        manual = Path(manual_dir)
        if not manual.is_dir() or not any(manual.iterdir()):
            raise DatasetError(f"{dataset}: --manual_dir {manual} is not a folder with files; "
                               f"give the {dataset} folder as its publisher ships it")
        with _tfds_quiet():
            builder = faces.make_builder(dataset, data_dir, resolved, strict=strict)
        with tempfile.TemporaryDirectory(prefix="fbnet-prepare-") as downloads, \
                _tfds_quiet():
            builder.download_and_prepare(
                download_dir=downloads, file_format="array_record",
                download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual)))
    metadata = faces.read_metadata(directory)
    rewritten = 0
    if metadata["options"].get("image_size"):  # raw uint8 faces: read without decompressing
        rewritten = faces.store_uncompressed(directory)
    source_dir = metadata.get("manual_dir")
    if not written and source_dir and source_dir != os.path.abspath(manual_dir):
        raise DatasetError(
            f"{directory} already holds {dataset} with these options, prepared from "
            f"{source_dir}, not {os.path.abspath(manual_dir)}; give this copy another "
            f"--data_dir (a data_dir holds one preparation per dataset and options)")
    return Summary(dataset, os.fspath(directory), metadata["options"], written,
                   metadata["records"], metadata["skipped"], metadata.get("dropped", {}),
                   metadata.get("noted", {}), rewritten=0 if written else rewritten)


def run_command(dataset: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
                option_strings: list[str], strict: bool) -> int:
    """`fbnet prepare`: prepares (or finds prepared) `dataset` and prints the summary.

    `option_strings` are the `--option` values (`KEY=VALUE`). A progress bar with an ETA is
    shown per split while writing (on stderr); the summary ends with the records written and
    skipped per reason for each split.

    Returns:
      0 (the exit status).

    Raises:
      DatasetError: see `parse_options` and `prepare`; one line, for `fbnet` to print.
    """
    options = parse_options(dataset, option_strings)
    summary = prepare(dataset, manual_dir, data_dir, options, strict=strict)
    print("\n".join(summary.lines()), flush=True)
    return 0
