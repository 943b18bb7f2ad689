"""The `fbnet` command.

  fbnet train [--config FILE[:VARIANT]] [--workdir DIR] [--config.FIELD=VALUE ...]
      Trains and evaluates; with no flags, the embedded synthetic experiment
      (configs/synthetic.py) in a new folder under runs/. A run restarted with the same
      --workdir continues from its latest checkpoint.
  fbnet eval --workdir DIR [--split SPLIT] [--step N]
      Re-evaluates the latest (or given) checkpoint of a run with the config it was trained with.
"""

from __future__ import annotations

import datetime
import logging
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

COMMANDS = ("train", "eval")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic.py"

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(DEFAULT_CONFIG), "Experiment config file (FILE or FILE:VARIANT).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Work directory of the run (train: default runs/<name>-<time>).")
_SPLIT = flags.DEFINE_string("split", None, "eval: the split to evaluate (default: the config's "
                             "train.test_split).")
_STEP = flags.DEFINE_integer("step", None, "eval: the checkpoint step (default: the latest).")


def _setup_logging() -> None:
    """Plain `HH:MM:SS message` lines instead of absl's verbose prefix."""
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.get_absl_handler().setFormatter(
        logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    absl_logging.set_verbosity(absl_logging.INFO)
    # Third-party INFO chatter (orbax, grain) would drown the progress lines.
    for name in ("absl", "orbax", "grain", "jax"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _default_workdir(name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-{stamp}"


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: fbnet {{{'|'.join(COMMANDS)}}} [flags]; see fbnet --help")
    _setup_logging()
    # Imported after flag parsing so that `fbnet --help` stays fast.
    from fbnet_jax import evaluate, train  # pylint: disable=g-import-not-at-top
    if argv[1] == "train":
        config = _CONFIG.value
        workdir = Path(_WORKDIR.value) if _WORKDIR.value else _default_workdir(config.name)
        print(f"work directory: {workdir}", flush=True)
        train.train_and_evaluate(config, workdir)
        print(f"done; results in {workdir / 'metrics.json'}", flush=True)
    else:
        if not _WORKDIR.value:
            raise app.UsageError("fbnet eval needs --workdir (the folder of a training run)")
        evaluate.evaluate_workdir(_WORKDIR.value, split=_SPLIT.value, step=_STEP.value)


def run() -> None:
    """Console entry point."""
    # absl's --help shows the __main__ module's docstring; under the console script __main__ is
    # the generated wrapper, so lend it this module's.
    sys.modules["__main__"].__doc__ = __doc__
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    run()
