"""The runtime defaults of fbnet_jax: XLA flags, malloc settings and CPU dispatch."""

import os
import subprocess
import sys

import pytest

import fbnet_jax
from conftest import REPO

DEFAULT = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
UNDO = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"

# Prints how many YNNPACK fusions the CPU backend made of a program that is one convolution.
_PROGRAM = """
import fbnet_jax, jax, jax.numpy as jnp
x, k = jnp.ones((8, 32, 32, 16)), jnp.ones((3, 3, 16, 32))
conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
    x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
print(conv.lower(x, k).compile().as_text().count("__ynn_fusion"))
"""


def test_defaults_are_added_unless_the_flag_is_given():
    assert fbnet_jax.XLA_DEFAULTS == (DEFAULT,)
    assert fbnet_jax._with_xla_defaults("") == DEFAULT
    assert fbnet_jax._with_xla_defaults(" --xla_dump_to=/tmp/d ") == f"--xla_dump_to=/tmp/d {DEFAULT}"
    assert fbnet_jax._with_xla_defaults(UNDO) == UNDO
    assert fbnet_jax._with_xla_defaults(f"--a=1 {UNDO} --b") == f"--a=1 {UNDO} --b"


def _ynn_fusions(xla_flags):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    result = subprocess.run([sys.executable, "-c", _PROGRAM], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=True,
                            env={**env, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
    return int(result.stdout.split()[-1])


def test_the_cpu_convolutions_leave_ynnpack_unless_the_user_says_otherwise():
    assert _ynn_fusions(None) == 0          # the project's default
    assert _ynn_fusions(UNDO) == 1          # XLA's own default: the convolution in YNNPACK


# Page faults of a run of a program whose temporary memory is a 64 MB convolution output: with
# the defaults the block is reused, without them each run maps (and faults through) a new one.
_FAULTS = """
import resource
import fbnet_jax, jax, jax.numpy as jnp
from fbnet_jax import state
x = jnp.ones((16, 128, 128, 64), jnp.float32)
k = jnp.ones((3, 3, 64, 64), jnp.float32) / 576
step = jax.jit(lambda x, k: jnp.tanh(jax.lax.conv_general_dilated(
    x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))).sum())
for _ in range(2):
    step(x, k).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step(x, k).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


def _faults_per_run(**env):
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
    result = subprocess.run([sys.executable, "-c", _FAULTS], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=True,
                            env={**base, **env, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_step_reuses_its_memory_instead_of_faulting_it_in_again():
    block = 16 * 128 * 128 * 64 * 4 // 4096  # pages of the 64 MB temporary
    # The block is reused. On a busy machine a run may still fault through about 11 MB of a
    # thread pool worker's scratch memory (0 or about 2,860 pages a run with two other processes
    # spinning on the two cores), far below the block's 16,384.
    assert _faults_per_run() < block // 4
    # Each half of the defaults alone leaves the block to mmap: above a thread's 64 MB heap when
    # dispatch is asynchronous, and always when malloc maps blocks that large.
    assert _faults_per_run(FBNET_JAX_CPU_ASYNC_DISPATCH="1") > block // 2
    assert _faults_per_run(MALLOC_MMAP_MAX_="65536") > block // 2


def test_malloc_defaults_yield_to_the_users_settings():
    both = {"M_TRIM_THRESHOLD": (1 << 31) - 1, "M_MMAP_MAX": 0}
    assert fbnet_jax.MALLOC_DEFAULTS == both
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt")
    assert fbnet_jax._apply_malloc_defaults({}) == both
    assert fbnet_jax._apply_malloc_defaults({"MALLOC_MMAP_MAX_": "65536"}) == {
        "M_TRIM_THRESHOLD": (1 << 31) - 1}
    assert fbnet_jax._apply_malloc_defaults(
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}) == {"M_MMAP_MAX": 0}
    assert fbnet_jax._apply_malloc_defaults(
        {"MALLOC_TRIM_THRESHOLD_": "1", "MALLOC_MMAP_MAX_": "1"}) == {}


@pytest.mark.parametrize("value,asynchronous", [("1", True), ("Yes", True), ("0", False),
                                                ("off", False), ("", False)])
def test_the_dispatch_switch_reads_the_usual_spellings(monkeypatch, value, asynchronous):
    updates = []
    monkeypatch.setenv(fbnet_jax.CPU_ASYNC_DISPATCH_ENV, value)
    monkeypatch.setattr("jax.config.update", lambda name, v: updates.append((name, v)))
    fbnet_jax.set_jax_defaults()
    assert updates == ([] if asynchronous else [("jax_cpu_enable_async_dispatch", False)])


def test_a_misspelt_dispatch_switch_is_one_line_naming_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-m", "fbnet_jax.main", "train", f"--workdir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**env, "PYTHONPATH": str(REPO), "FBNET_JAX_CPU_ASYNC_DISPATCH": "maybe"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "fbnet: error: FBNET_JAX_CPU_ASYNC_DISPATCH='maybe': expected 1 (keep JAX's "
        "asynchronous CPU dispatch) or 0 (the default, synchronous)")
    assert not (tmp_path / "run").exists()
