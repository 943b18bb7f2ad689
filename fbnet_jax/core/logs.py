"""Log lines on the console and in the run's `train.log`.

One format for both: a time stamp and the message, with `WARNING:` / `ERROR:` in front of the
message when it is one, so a warning never looks like a progress line. The console shows the
time only; `train.log` the date and time, since a run's log spans days and restarts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

LOG_FILE = "train.log"

# Libraries whose INFO lines would drown the progress lines; their warnings still show.
QUIET_LOGGERS = ("absl", "orbax", "grain", "jax", "tensorstore")


class LineFormatter(logging.Formatter):
    """`<time> <message>`, with the level named for warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if record.levelno >= logging.WARNING:
            stamp = self.formatTime(record, self.datefmt)
            line = f"{stamp} {record.levelname}: {line[len(stamp) + 1:]}"
        return line


def console_formatter() -> LineFormatter:
    return LineFormatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")


def file_formatter() -> LineFormatter:
    return LineFormatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


def quiet_libraries() -> None:
    """Shows only warnings and errors from the chatty libraries (orbax's INFO lines, ...)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def to_file(workdir: str | Path) -> Iterator[Path]:
    """Appends every log line of the block to `workdir/train.log` (the directory must exist).

    An exception leaving the block is written there too, as one `ERROR:` line: the console
    prints it once (the `fbnet` command does), and the log must not lose it.
    """
    path = Path(workdir) / LOG_FILE
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(file_formatter())
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield path
    except BaseException as e:
        if not isinstance(e, GeneratorExit):
            level = logging.WARNING if isinstance(e, KeyboardInterrupt) else logging.ERROR
            message = str(e) or type(e).__name__
            handler.handle(logging.LogRecord(__name__, level, __file__, 0,
                                             f"{type(e).__name__}: {message}", None, None))
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
