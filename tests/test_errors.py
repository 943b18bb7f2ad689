"""One error family: every error the user acts on is a `UserError`, which `fbnet` prints as one
line and exits with the status the error carries."""

import importlib
import pkgutil
import subprocess
import sys

import pytest

from conftest import REPO
from data_pipelines import workers
from data_pipelines.sources.base import BadRecordError, DatasetError
from fbnet_jax.serve import export
from fbnet_jax.cli import main
from fbnet_jax.core.errors import ConfigError, UserError

# The exception classes of fbnet_jax and data_pipelines that are not UserErrors, and why.
INTERNAL = {
    "fbnet_jax.train.signals.TrainingStopped":
        "not an error but the stop the user asked for (a signal, train.stop_after_steps): "
        "train_and_evaluate logs its line (into train.log too) and fbnet exits 75 without an "
        "error line",
    "fbnet_jax.eval.evaluate.Interrupted":
        "control flow: a stop request abandons an evaluation, and the training loop catches it",
    "data_pipelines.sources.affwild2._Skip":
        "control flow inside the Aff-Wild2 label parser: a row it counts as skipped",
}


def _exception_classes() -> dict[str, type]:
    """{module.Class: class} of every exception class defined at the top of a module."""
    found = {}
    for package in ("fbnet_jax", "data_pipelines"):
        names = [package] + [info.name for info in pkgutil.walk_packages(
            importlib.import_module(package).__path__, package + ".")]
        for name in names:
            for value in vars(importlib.import_module(name)).values():
                if (isinstance(value, type) and issubclass(value, BaseException)
                        and value.__module__ == name):
                    found[f"{name}.{value.__qualname__}"] = value
    return found


def test_every_user_facing_error_is_a_user_error():
    classes = _exception_classes()
    assert {"fbnet_jax.core.errors.ConfigError", "data_pipelines.sources.base.DatasetError",
            "data_pipelines.workers.WorkerDied"} <= set(classes)
    others = {name for name, cls in classes.items() if not issubclass(cls, UserError)}
    assert others == set(INTERNAL), (
        "an exception class that is not a UserError: derive it from "
        "fbnet_jax.core.errors.UserError if its message is for the user, or list it in INTERNAL with the reason")


def test_the_errors_import_without_jax():
    code = "import sys, fbnet_jax.core.errors; print(sorted({'jax', 'numpy'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=True, env={"PYTHONPATH": str(REPO)})
    assert result.stdout.split() == ["[]"]


class _Failed(UserError):
    exit_code = 3


@pytest.mark.parametrize("error, line, status", [
    (UserError("--step 7: no such checkpoint"), "--step 7: no such checkpoint", 2),
    (ConfigError(["a: bad", "b: bad"]), "invalid config:\n  - a: bad\n  - b: bad", 2),
    (DatasetError("labels.csv: no header"), "labels.csv: no header", 2),
    (BadRecordError("labels.csv:3: unknown expression code"),
     "labels.csv:3: unknown expression code", 2),
    (workers.WorkerDied("grain worker 1 was killed by signal 9 (SIGKILL)"),
     "grain worker 1 was killed by signal 9 (SIGKILL)", 1),
    (export.ParityError("onnx: output va differs by 0.1"), "onnx: output va differs by 0.1", 1),
    (_Failed("an error of its own status"), "an error of its own status", 3),
    (FloatingPointError("the loss is NaN at step 3"), "the loss is NaN at step 3", 1),
    (KeyboardInterrupt(), "interrupted", 130),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None)
def test_fbnet_prints_an_error_as_one_line_with_its_status(monkeypatch, capsys, error, line,
                                                            status):
    def fail(command, config):
        raise error

    monkeypatch.delenv("FBNET_DEBUG", raising=False)
    monkeypatch.setattr(sys.modules["__main__"], "__doc__", sys.modules["__main__"].__doc__)
    monkeypatch.setattr(main, "_setup_logging", lambda: None)
    monkeypatch.setattr(main, "_parse", lambda argv: ("compare", None))
    monkeypatch.setattr(main, "main", fail)
    with pytest.raises(SystemExit) as exited:
        main.run(["fbnet", "compare"])
    assert exited.value.code == status
    assert capsys.readouterr().err == f"fbnet: error: {line}\n"
