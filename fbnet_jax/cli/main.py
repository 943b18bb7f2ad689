"""The `fbnet` command.

  fbnet train [--config FILE[:VARIANT]] [--workdir DIR] [--config.FIELD=VALUE ...]
              [--allow_config_change]
      Trains and evaluates; with no flags, the embedded synthetic experiment (configs/synthetic.py)
      in a new folder under runs/. A run restarted with the same --workdir continues from its
      latest checkpoint; SIGTERM or Ctrl-C saves a checkpoint and stops (Ctrl-C twice: at once).
      On several hosts, start one process per host with --coordinator_address HOST:PORT
      --num_processes N --process_id I (or under srun / on a Cloud TPU slice, with none of them).
  fbnet eval (--workdir DIR [--step N] | --checkpoint DIR/checkpoints/N) [--evals NAME,...]
             [--split SPLIT] [--config FILE[:VARIANT]] [--config.FIELD=VALUE ...]
      Runs the evaluators of the config (config.evals; default: the final ones) on the latest
      (or given) checkpoint of a run, with the config stored in it, or the config FILE (which
      must build the same network), and writes the metrics and a report under DIR/eval/;
      --split runs them on another split; --config.FIELD=VALUE changes a setting (e.g.
      data.eval_batch_size).
  fbnet relatedness --out FILE [--config FILE[:VARIANT]] [--min_count N] [--max_examples N]
                    [--config.FIELD=VALUE ...]
      Counts P(AU active | expression) on the training data of the config's sources that label
      both, prints it beside Du et al.'s table and writes it as a JSON table for
      --config.loss.relatedness=FILE. Entries with fewer than --min_count (20) labelled examples
      stay unestimated; --max_examples N reads at most N examples per source (a quick look).
  fbnet prepare --dataset NAME --manual_dir DIR --data_dir DIR [--option KEY=VALUE ...]
                [--strict]
      Decodes every face of dataset NAME (read from DIR as its publisher ships it) once and
      writes them with their labels as TFDS array_record under --data_dir; a config reads the
      copy with --config.data.sources.SOURCE.prepared=DATA_DIR. A second run writes nothing.
      Ends with the records written per split and those skipped per reason.
  fbnet export (--workdir DIR [--step N] | --checkpoint DIR/checkpoints/N)
               --format onnx|stablehlo|savedmodel|safetensors --out PATH
      Writes the network for inference (BatchNorm statistics, no dropout, any batch size) with
      what a consumer needs (labels, AU list, preprocessing, config), then checks the exported
      model against the JAX one on synthetic faces.
  fbnet predict --workdir DIR [--step N] --out preds.csv|preds.jsonl [--no-detect]
                [--stride N] [--batch_size N] IMAGES_FOLDERS_OR_VIDEOS...
      Finds every face (OpenCV's Haar cascade; --no-detect for face crops), and writes one row
      per face: expression probabilities, AU probabilities, valence and arousal.
  fbnet compare RUN_DIR RUN_DIR... [--split SPLIT] [--per_source] [--out compare.md]
      The metrics of several runs side by side (best marked, differences to the first run).
  fbnet convert-weights --from FILE.pth --out FILE.npz [--layout L] [--backbone B]
                        [--fc6_adaptive_pool]
      Converts PyTorch weights (the VGG-Face port, torchvision VGG16 or ResNet-50) into a
      backbone's variables, for --config.model.init_from=FILE.npz.

FILE is a path or the name of a shipped config (`synthetic`). Add --debug (or set FBNET_DEBUG=1)
to see the traceback of an error. Exit status: 0 done; 1 failed (e.g. the training diverged);
2 a mistake in the command or config, a dataset that cannot be read, or a damaged checkpoint
(nothing was changed); 75 stopped before the end with a checkpoint saved (run the same command
again to continue); 130 interrupted at once.
"""

from __future__ import annotations

import datetime
import difflib
import logging
import os
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from fbnet_jax.core import config_files, logs, runtime_defaults
from fbnet_jax.core.errors import EXIT_FAILED, UserError

COMMANDS = ("train", "eval", "relatedness", "prepare", "export", "predict", "convert-weights",
            "compare")
# Commands that take no config: their flags say what to do.
PLAIN_COMMANDS = ("prepare", "export", "predict", "convert-weights", "compare")
# Commands whose words after the command are inputs (files, folders, runs).
INPUT_COMMANDS = ("predict", "compare")
EXIT_STOPPED, EXIT_INTERRUPTED = 75, 130  # a UserError carries its own (fbnet_jax/core/errors.py)
HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull", "--helpxml", "-?")

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Work directory of the run (train: default runs/<name>-<time>).")
_SPLIT = flags.DEFINE_string("split", None, "eval: run the evaluators on this split instead of "
                             "their own; compare: the split to compare.")
_EVALS = flags.DEFINE_list("evals", None, "eval: the evaluators of config.evals to run, "
                           "comma-separated (default: those with final=True).")
_STEP = flags.DEFINE_integer("step", None, "eval, export, predict: the checkpoint step "
                             "(default: the latest).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "train: continue a run although its config changed in fields "
    "that change the training (learning rate, steps, data, ...).")
_OUT = flags.DEFINE_string("out", None, "relatedness: the JSON table file to write; export: "
                           "the exported file; predict: preds.csv or preds.jsonl; "
                           "convert-weights: the converted .npz or .safetensors file.")
_MIN_COUNT = flags.DEFINE_integer(
    "min_count", 20, "relatedness: entries with fewer labelled examples stay unestimated.",
    lower_bound=1)
_MAX_EXAMPLES = flags.DEFINE_integer(
    "max_examples", None, "relatedness: read at most this many examples per source (default: "
    "all).", lower_bound=1)
_DATASET = flags.DEFINE_string("dataset", None, "prepare: the dataset (affectnet, rafdb, "
                               "affwild2, ..., manifest).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "prepare: the dataset's folder as its "
                                  "publisher ships it.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "prepare: where the prepared copy is written "
                                "(a config reads it with data.sources.NAME.prepared=DATA_DIR).")
_OPTION = flags.DEFINE_multi_string("option", [], "prepare: a dataset option KEY=VALUE "
                                    "(repeat the flag for several), or margin=M, or "
                                    "image_size=N (faces stored N x N as raw uint8).")
_STRICT = flags.DEFINE_bool("strict", False, "prepare: stop at the first record that cannot "
                            "be read, instead of skipping and counting it.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "train, eval: HOST:PORT of process 0 in a multi-process run "
    "(several hosts); with --num_processes and --process_id. Without them, SLURM (srun) and "
    "Cloud TPU launches are detected.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "train, eval: the number of processes of a multi-process run.",
    lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "train, eval: this process's index, 0 .. num_processes - 1.",
    lower_bound=0)
_FORMAT = flags.DEFINE_string("format", None, "export: onnx, stablehlo, savedmodel or "
                              "safetensors.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "export, eval: a checkpoint directory on "
                                  "its own (<workdir>/checkpoints/<step>), instead of --workdir.")
_DETECT = flags.DEFINE_bool("detect", True, "predict: find the faces in each image (OpenCV's "
                            "Haar cascade); --no-detect for images that are face crops already.")
_STRIDE = flags.DEFINE_integer("stride", 1, "predict: every N-th frame of a video.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "predict: faces per inference batch.",
                                   lower_bound=1)
_FROM = flags.DEFINE_string("from", None, "convert-weights: a PyTorch state dict (.pth/.pt) or "
                            "an .npz/.safetensors of one.")
_LAYOUT = flags.DEFINE_string("layout", None, "convert-weights: vgg_face_torch, "
                              "torchvision_vgg16 or torchvision_resnet50 (default: from the keys).")
_BACKBONE = flags.DEFINE_string("backbone", None, "convert-weights: the backbone the weights are "
                                "for (default: from the layout).")
_PER_SOURCE = flags.DEFINE_bool("per_source", False, "compare: also each source's metrics, not "
                                 "only the whole split's.")
_FC6_ADAPTIVE_POOL = flags.DEFINE_bool(
    "fc6_adaptive_pool", False, "convert-weights: let VGG-Face's fc6 (trained on a 7x7 grid, "
    "224 px) be used at other image sizes, averaging the feature map to 7x7 (an approximation).")
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks of errors (also: FBNET_DEBUG=1).")

log = logging.getLogger("fbnet_jax.cli.main")


def _fail(message: str, status: int) -> None:
    print(f"fbnet: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def _debug(argv: list[str]) -> bool:
    return (os.environ.get("FBNET_DEBUG", "") not in ("", "0")
            or any(a in ("--debug", "-debug", "--debug=true", "--debug=1") for a in argv))


def _option_value(argv: list[str], name: str) -> tuple[str | None, list[str]]:
    """Takes `--name VALUE` / `--name=VALUE` out of argv; returns (VALUE or None, the rest)."""
    value, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in (f"--{name}", f"-{name}"):
            if i + 1 >= len(argv):
                raise UserError(f"--{name} needs a value")
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith((f"--{name}=", f"-{name}=")):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return value, rest


def _config_paths(config, prefix: str = "") -> list[str]:
    paths = []
    for key in config.keys():
        value = config[key]
        if hasattr(value, "keys") and not isinstance(value, (str, bytes)):
            paths.extend(_config_paths(value, f"{prefix}{key}."))
        else:
            paths.append(f"{prefix}{key}")
    return paths


def _check_overrides(argv: list[str], config) -> None:
    """Names a misspelt `--config.FIELD` in one line, with the closest fields."""
    known = _config_paths(config)
    for arg in argv:
        for flag in ("--config.", "-config.", "--noconfig.", "-noconfig."):
            if arg.startswith(flag):
                path = arg[len(flag):].split("=", 1)[0]
                if path not in known:
                    close = difflib.get_close_matches(path, known, n=3, cutoff=0.8)
                    hint = f"; did you mean {' or '.join(close)}?" if close else ""
                    raise UserError(f"--config.{path}: the config has no field {path!r}{hint}")


def _command(argv: list[str]) -> str:
    """The command word: the first argument that is neither a flag nor a flag's value."""
    try:
        rest = flags.FLAGS(argv, known_only=True)[1:]  # consumes --workdir DIR etc.
    except flags.Error as e:
        raise UserError(str(e)) from e
    words, previous = [], ""
    for arg in rest:
        if not arg.startswith("-"):
            # `--config.FIELD VALUE`: the value of an override, not a word.
            is_value = previous.startswith(("--config.", "-config.")) and "=" not in previous
            if not is_value or (not words and arg in COMMANDS):
                words.append(arg)
        previous = arg
    if not words or words[0] not in COMMANDS:
        got = f" (got {words[0]!r})" if words else ""
        raise UserError(f"usage: fbnet {{{'|'.join(COMMANDS)}}} [flags]{got}; see fbnet --help")
    if len(words) > 1 and words[0] not in INPUT_COMMANDS:
        raise UserError(f"unexpected argument {words[1]!r} (flags are written --name=value)")
    return words[0]


def _inputs(argv: list[str]) -> list[str]:
    """The inputs of predict and compare: the words after the command that are not flags."""
    rest = flags.FLAGS(argv, known_only=True)[1:]
    words = [a for a in rest if not a.startswith("-")]
    return words[1:]


def _parse(argv: list[str]) -> tuple[str, object]:
    """Defines the `--config` flag for the command and parses every flag.

    train, relatedness: the config comes from --config FILE[:VARIANT] (default: the shipped
    synthetic one).
    eval: it is the config stored with the checkpoint being evaluated (--workdir and --step, or
    --checkpoint), or --config FILE when given (checked against the checkpoint later).
    In all, `--config.FIELD=VALUE` overrides are checked against that config.
    """
    spec, argv = _option_value(argv, "config")
    # absl spells a false boolean --nodetect; the documented spelling is --no-detect.
    argv = ["--nodetect" if a in ("--no-detect", "--no_detect") else a for a in argv]
    command = _command(argv)
    if command in ("train", "eval"):  # before anything (reading a checkpoint) uses a device
        _start_processes()
    if command in PLAIN_COMMANDS:
        return command, _parse_plain(command, spec, argv)
    if command in ("train", "relatedness"):
        config = config_files.load(spec or config_files.DEFAULT)
    elif spec is not None:
        config = config_files.load(spec)
    else:
        from fbnet_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
        logs.quiet_libraries()
        config = evaluate.stored_config(_WORKDIR.value, _CHECKPOINT.value, _STEP.value)
    _check_overrides(argv, config)
    try:  # the overrides are parsed both here (named in sys_argv) and by FLAGS(argv)
        holder = config_flags.DEFINE_config_dict(
            "config", config, "The experiment config; override its fields with "
            "--config.FIELD=VALUE.", lock_config=True, sys_argv=argv)
        flags.FLAGS(argv)
    except (flags.Error, TypeError, ValueError) as e:
        raise UserError(str(e).split(" Currently supported types")[0]) from e
    _refuse_other_commands_flags(command)
    return command, holder.value


# The flags that belong to one command or a few (the others, such as --debug, to all).
COMMAND_FLAGS = {
    "train": ("workdir", "allow_config_change", "coordinator_address", "num_processes",
              "process_id"),
    "eval": ("workdir", "checkpoint", "evals", "split", "step", "coordinator_address",
             "num_processes", "process_id"),
    "relatedness": ("out", "min_count", "max_examples"),
    "prepare": ("dataset", "manual_dir", "data_dir", "option", "strict"),
    "export": ("workdir", "step", "checkpoint", "format", "out"),
    "predict": ("workdir", "step", "out", "detect", "stride", "batch_size"),
    "convert-weights": ("from", "out", "layout", "backbone", "fc6_adaptive_pool"),
    "compare": ("out", "split", "per_source"),
}
# What each command without a config cannot do without.
REQUIRED_FLAGS = {
    "prepare": ("dataset", "manual_dir", "data_dir"),
    "export": ("format", "out"),
    "predict": ("workdir", "out"),
    "convert-weights": ("from", "out"),
    "compare": (),
}


def _refuse_other_commands_flags(command: str) -> None:
    other = {name for names in COMMAND_FLAGS.values() for name in names} - set(
        COMMAND_FLAGS[command])
    given = [f"--{name}" for name in sorted(other) if flags.FLAGS[name].present]
    if given:
        raise UserError(f"{' and '.join(given)}: not a flag of fbnet {command}")


def _parse_plain(command: str, spec: str | None, argv: list[str]) -> list[str] | None:
    """The commands without a config: their flags say what to do.

    Returns:
      the inputs of predict and compare; None for the others.
    """
    if spec is not None or any(a.startswith(("--config.", "-config.")) for a in argv):
        raise UserError(f"fbnet {command} takes no --config; its flags are "
                        f"{', '.join('--' + n for n in COMMAND_FLAGS[command])}")
    inputs = _inputs(argv) if command in INPUT_COMMANDS else None
    # `_command` parsed the known flags already; a multi flag would collect its values twice.
    flags.FLAGS["option"].unparse()
    try:
        flags.FLAGS(argv)
    except flags.Error as e:
        raise UserError(str(e)) from e
    missing = [f"--{n}" for n in REQUIRED_FLAGS[command] if not flags.FLAGS[n].value]
    if command == "export" and not (_WORKDIR.value or _CHECKPOINT.value):
        missing.insert(0, "--workdir (or --checkpoint)")
    if missing:
        raise UserError(f"fbnet {command} needs {', '.join(missing)}")
    if command == "export" and _WORKDIR.value and _CHECKPOINT.value:
        raise UserError("fbnet export takes --workdir (with --step) or --checkpoint, not both")
    if command == "predict" and not inputs:
        raise UserError("fbnet predict needs images, folders or videos to predict on: "
                        "fbnet predict --workdir DIR --out preds.csv PATH...")
    if command == "compare" and len(inputs) < 1:
        raise UserError("fbnet compare needs the work directories of runs: fbnet compare "
                        "RUN_DIR RUN_DIR... [--out compare.md]")
    _refuse_other_commands_flags(command)
    return inputs


def _setup_logging() -> None:
    """Plain `HH:MM:SS message` lines on stderr (warnings named), INFO and above."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.console_formatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logs.quiet_libraries()


def _default_workdir(name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-{stamp}"


def _start_processes() -> None:
    """Joins a multi-process run (flags, or a detected launcher) before any device is used."""
    import jax  # pylint: disable=g-import-not-at-top
    from fbnet_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
    try:
        started = parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                                  _PROCESS_ID.value)
    except ValueError as e:
        raise UserError(str(e)) from e
    except Exception as e:  # pylint: disable=broad-except  # jax raises runtime errors of XLA
        raise UserError(f"could not start the multi-process runtime: {e}; see README.md "
                        f"(launching on several hosts) for what to check") from e
    if started:
        log.info("%s", started)
        if jax.process_index() != 0:  # process 0 reports; the others only warn
            logging.getLogger().setLevel(logging.WARNING)


def main(command: str, config) -> int:
    """Runs a parsed command with its config (predict: its inputs); returns the exit status."""
    # Imported after flag parsing so that `fbnet --help` stays fast.
    if command == "prepare":
        from data_pipelines.tfds_builders import prepare  # pylint: disable=g-import-not-at-top
        return prepare.run_command(_DATASET.value, _MANUAL_DIR.value, _DATA_DIR.value,
                                   list(_OPTION.value), _STRICT.value)
    if command == "export":
        from fbnet_jax.serve import export  # pylint: disable=g-import-not-at-top
        return export.run_command(_WORKDIR.value, _CHECKPOINT.value, _STEP.value, _FORMAT.value,
                                  _OUT.value)
    if command == "predict":
        from fbnet_jax.serve import predict  # pylint: disable=g-import-not-at-top
        return predict.run_command(_WORKDIR.value, _STEP.value, config, _OUT.value,
                                   _DETECT.value, _STRIDE.value, _BATCH_SIZE.value)
    if command == "compare":
        from fbnet_jax.eval import compare  # pylint: disable=g-import-not-at-top
        return compare.run_command(config, _OUT.value, _SPLIT.value,
                                   per_source=_PER_SOURCE.value)
    if command == "convert-weights":
        from fbnet_jax.model import weights  # pylint: disable=g-import-not-at-top
        return weights.run_command(flags.FLAGS["from"].value, _OUT.value, _LAYOUT.value,
                                   _BACKBONE.value, fc6_adaptive_pool=_FC6_ADAPTIVE_POOL.value)
    if command == "relatedness":
        from fbnet_jax.eval import relatedness  # pylint: disable=g-import-not-at-top
        relatedness.run_command(config, _OUT.value, min_count=_MIN_COUNT.value,
                                max_examples=_MAX_EXAMPLES.value)
        return 0
    from fbnet_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
    from fbnet_jax.train import checks  # pylint: disable=g-import-not-at-top
    from fbnet_jax.train import loop as train  # pylint: disable=g-import-not-at-top
    if command == "train":
        workdir = Path(_WORKDIR.value) if _WORKDIR.value else _default_workdir(config.name)
        try:
            train.train_and_evaluate(config, workdir,
                                     allow_config_change=_ALLOW_CONFIG_CHANGE.value)
        except train.TrainingStopped:  # a stop, not an error: its line is logged already
            return EXIT_STOPPED
    else:
        checks.validate(config)
        evaluate.evaluate_workdir(_WORKDIR.value, split=_SPLIT.value, step=_STEP.value,
                                  config=config, checkpoint=_CHECKPOINT.value,
                                  names=_EVALS.value)
    return 0


def run(argv: list[str] | None = None) -> None:
    """Console entry point: user mistakes and failures end in one line, not a traceback."""
    argv = list(sys.argv if argv is None else argv)
    # absl's --help shows the __main__ module's docstring; under the console script __main__ is
    # the generated wrapper, so lend it this module's.
    sys.modules["__main__"].__doc__ = __doc__
    debug = _debug(argv)
    if any(a in HELP_FLAGS for a in argv):
        app.run(lambda _: None, argv=argv[:1] + [a for a in argv[1:] if a in HELP_FLAGS])
    _setup_logging()
    try:
        # Before anything starts a JAX backend, which reads XLA_FLAGS and fixes the dispatch mode.
        runtime_defaults.apply()
        command, config = _parse(argv)
        status = main(command, config)
    except (UserError, FloatingPointError, KeyboardInterrupt) as e:
        # One line each: a UserError with its exit status (a mistake, or a failure its message
        # explains); a training that diverged (ours, or JAX's debug_nans) with 1.
        if debug:
            raise
        if isinstance(e, KeyboardInterrupt):
            _fail("interrupted", EXIT_INTERRUPTED)
        _fail(str(e), e.exit_code if isinstance(e, UserError) else EXIT_FAILED)
    sys.exit(status)


if __name__ == "__main__":
    run()
