"""Shared test setup."""

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


COMPILATION_CACHE_PREFIX = "fbnet_jax_tests_compilation_cache_"
COMPILATION_CACHE_MAX_SIZE = 8 << 30  # bytes; a limit turns on JAX's file lock
_made_cache: list[str] = []


def pytest_configure(config):
    # grain's worker processes read absl flags; tests do not run under absl.app.run.
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    # Many tests compile the same steps, most of them in `fbnet` subprocesses: one JAX persistent
    # compilation cache for the whole session (this process, the xdist workers it starts and
    # every subprocess inherit the variables; JAX reads them when imported, after this). A size
    # limit turns on JAX's file lock, so two workers never read an entry half written.
    if not hasattr(config, "workerinput") and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _made_cache.append(tempfile.mkdtemp(prefix=COMPILATION_CACHE_PREFIX))
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _made_cache[0]
        os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(COMPILATION_CACHE_MAX_SIZE)
    # The tests run under the runtime defaults that `fbnet` sets for itself (XLA flags, malloc,
    # CPU dispatch), so that what they compute in process is what `fbnet` subprocesses compute.
    # After the variables above: JAX reads them when it is imported, as apply() may do.
    from fbnet_jax.core import runtime_defaults  # pylint: disable=g-import-not-at-top
    runtime_defaults.apply()


def pytest_unconfigure(config):  # pylint: disable=unused-argument
    for path in _made_cache:
        shutil.rmtree(path, ignore_errors=True)


def load_config(name: str = "synthetic.py", arg: str = ""):
    """`configs/<name>`'s get_config(arg), loaded from its file as `fbnet --config` does."""
    spec = importlib.util.spec_from_file_location(f"config_{name[:-3]}", REPO / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def load_benchmark(name: str):
    """`benchmarks/<name>.py` as a module (the benchmarks are scripts, not a package); its
    sibling scripts are importable from it."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_config():
    """The tiny synthetic config (a few steps on 32x32 images); locked, values settable."""
    return load_config("synthetic.py", "tiny")


def first_batch(config):
    """The first training batch of a config (this process's rows), iterator closed."""
    from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top
    iterator = pipeline.build_train_iterator(config)
    try:
        return next(iterator)
    finally:
        pipeline.close_iterator(iterator)


def train_tiny_run(path, num_steps: int = 2):
    """A finished tiny run of `num_steps` in `path` (checkpoint at the end, no periodic
    evaluation); returns `path`."""
    from fbnet_jax.train import loop as train  # pylint: disable=g-import-not-at-top
    config = load_config("synthetic.py", "tiny")
    config.train.num_steps = num_steps
    config.train.checkpoint_every = num_steps
    config.evals.validation.every = 0
    config.train.best_metric = ""
    train.train_and_evaluate(config, path)
    return path


def resnet50_shapes() -> dict[str, tuple]:
    """{key: torch shape} of torchvision's resnet50 state_dict (with fc of 5 classes)."""
    shapes = {}

    def conv_bn(conv, bn, out, inp, size):
        shapes[f"{conv}.weight"] = (out, inp, size, size)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{leaf}"] = (out,)
        shapes[f"{bn}.num_batches_tracked"] = ()

    conv_bn("conv1", "bn1", 64, 3, 7)
    inp = 64
    for layer, (blocks, width) in enumerate(((3, 64), (4, 128), (6, 256), (3, 512)), start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            conv_bn(f"{p}.conv1", f"{p}.bn1", width, inp, 1)
            conv_bn(f"{p}.conv2", f"{p}.bn2", width, width, 3)
            conv_bn(f"{p}.conv3", f"{p}.bn3", 4 * width, width, 1)
            if b == 0:
                conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", 4 * width, inp, 1)
            inp = 4 * width
    shapes["fc.weight"], shapes["fc.bias"] = (5, 2048), (5,)
    return shapes


def run_isolated(code: str, *, devices: int = 1, timeout: int = 300, cwd=None, args=()):
    """Runs python code in a fresh interpreter with `devices` fake CPU devices; returns stdout.

    `args` become the script's sys.argv[1:].
    """
    import subprocess  # pylint: disable=g-import-not-at-top
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd or REPO,
                            capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout
