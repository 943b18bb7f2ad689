"""The runtime defaults of fbnet_jax: XLA flags, malloc settings and CPU dispatch."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from fbnet_jax.core import runtime_defaults

DEFAULT = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
UNDO = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"

# Prints how many YNNPACK fusions the CPU backend made of a program that is one convolution.
_PROGRAM = """
from fbnet_jax.core import runtime_defaults
runtime_defaults.apply()
import jax, jax.numpy as jnp
x, k = jnp.ones((8, 32, 32, 16)), jnp.ones((3, 3, 16, 32))
conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
    x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
print(conv.lower(x, k).compile().as_text().count("__ynn_fusion"))
"""


def test_defaults_are_added_unless_the_flag_is_given():
    assert runtime_defaults.XLA_DEFAULTS == (DEFAULT,)
    assert runtime_defaults._with_xla_defaults("") == DEFAULT
    assert runtime_defaults._with_xla_defaults(" --xla_dump_to=/tmp/d ") == (
        f"--xla_dump_to=/tmp/d {DEFAULT}")
    assert runtime_defaults._with_xla_defaults(UNDO) == UNDO
    assert runtime_defaults._with_xla_defaults(f"--a=1 {UNDO} --b") == f"--a=1 {UNDO} --b"


def test_the_defaults_import_nothing_heavy():
    # `fbnet --help` and a mistake in a flag stay fast although the command imports them first.
    code = ("import sys, fbnet_jax.core.runtime_defaults; "
            "print(sorted({'jax', 'numpy'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=True, env={"PYTHONPATH": str(REPO)})
    assert result.stdout.split() == ["[]"]


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
from fbnet_jax.core import runtime_defaults
runtime_defaults.apply()
import jax, jax.numpy as jnp
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
    assert runtime_defaults.MALLOC_DEFAULTS == both
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt")
    assert runtime_defaults._apply_malloc_defaults({}) == both
    assert runtime_defaults._apply_malloc_defaults({"MALLOC_MMAP_MAX_": "65536"}) == {
        "M_TRIM_THRESHOLD": (1 << 31) - 1}
    assert runtime_defaults._apply_malloc_defaults(
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}) == {"M_MMAP_MAX": 0}
    assert runtime_defaults._apply_malloc_defaults(
        {"MALLOC_TRIM_THRESHOLD_": "1", "MALLOC_MMAP_MAX_": "1"}) == {}


@pytest.mark.parametrize("value,asynchronous", [("1", True), ("Yes", True), ("0", False),
                                                ("off", False), ("", False)])
def test_the_dispatch_switch_reads_the_usual_spellings(monkeypatch, value, asynchronous):
    updates = []
    monkeypatch.setenv("XLA_FLAGS", "")  # apply() adds the defaults; monkeypatch restores it
    monkeypatch.setenv(runtime_defaults.CPU_ASYNC_DISPATCH_ENV, value)
    monkeypatch.setattr("jax.config.update", lambda name, v: updates.append((name, v)))
    runtime_defaults.apply()
    assert updates == ([] if asynchronous else [("jax_cpu_enable_async_dispatch", False)])


def test_a_misspelt_dispatch_switch_is_one_line_naming_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-m", "fbnet_jax", "train", f"--workdir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**env, "PYTHONPATH": str(REPO), "FBNET_JAX_CPU_ASYNC_DISPATCH": "maybe"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "fbnet: error: FBNET_JAX_CPU_ASYNC_DISPATCH='maybe': expected 1 (keep JAX's "
        "asynchronous CPU dispatch) or 0 (the default, synchronous)")
    assert not (tmp_path / "run").exists()


# Imports every module of fbnet_jax and data_pipelines in a fresh interpreter and prints what the
# process looked like before and after: its environment, JAX's config, and whether glibc still
# serves a 64 MB block with mmap (it does unless something set M_MMAP_MAX to 0 through mallopt;
# blocks above 32 MB are always mapped by default, and checking frees the block again).
# Every module imports without the optional extras (torch, tensorflow: imported where used).
_IMPORT_EVERYTHING = r"""
import ctypes, importlib, json, os, pkgutil, sys
import jax


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def big_block_mapped():
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):  # not glibc (2.33 or later)
        return None
    libc.mallinfo2.restype = Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(64 << 20)
    mapped = libc.mallinfo2().hblkhd - before >= 64 << 20
    libc.free(block)
    return mapped


def process():
    return {"environ": dict(os.environ), "big_block_mapped": big_block_mapped(),
            "jax_config": {name: repr(value) for name, value in jax.config.values.items()}}


before = process()
modules = []
for package in ("fbnet_jax", "data_pipelines"):
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        importlib.import_module(info.name)
        modules.append(info.name)
print(json.dumps({"before": before, "after": process(), "modules": modules}))
"""

# Variables that libraries the project imports set at their own import, not the project.
THIRD_PARTY_VARIABLES = {
    "LD_LIBRARY_PATH": "cv2/__init__.py adds OpenCV's bundled library folder",
    "CRC32C_SW_MODE": "tensorboardX/crc32c.py picks its CRC implementation",
}


@pytest.mark.parametrize("xla_flags", [None, "--xla_force_host_platform_device_count=2"])
def test_importing_every_module_changes_no_process_setting(xla_flags):
    # Without the user settings that the defaults yield to, so that any default set at import
    # shows.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in (
        "XLA_FLAGS", "GLIBC_TUNABLES", runtime_defaults.CPU_ASYNC_DISPATCH_ENV)}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    result = subprocess.run([sys.executable, "-c", _IMPORT_EVERYTHING], cwd=REPO,
                            capture_output=True, text=True, timeout=300, check=False,
                            env={**env, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.splitlines()[-1])
    before, after = seen["before"], seen["after"]
    assert {"fbnet_jax.cli.main", "fbnet_jax.runtime.parallel", "data_pipelines.schema",
            "data_pipelines.tfds_builders.prepare"} <= set(seen["modules"])
    assert after["environ"].get("XLA_FLAGS") == xla_flags
    changed = {name for name in before["environ"].keys() | after["environ"].keys()
               if before["environ"].get(name) != after["environ"].get(name)}
    assert changed <= set(THIRD_PARTY_VARIABLES), changed
    assert after["jax_config"] == before["jax_config"]
    assert after["jax_config"]["jax_cpu_enable_async_dispatch"] == "True"
    assert after["big_block_mapped"] == before["big_block_mapped"]
