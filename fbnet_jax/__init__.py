"""FaceBehaviorNet in JAX. `fbnet_jax.Predictor` runs a trained network (fbnet_jax/predict.py).

Importing the package sets the project's runtime defaults for the backends that start after it:
XLA flags (`XLA_DEFAULTS`) and glibc malloc settings (`MALLOC_DEFAULTS`); importing
fbnet_jax.parallel sets synchronous CPU dispatch (`set_jax_defaults`). Each yields to the user's
own setting of it.
"""

import ctypes as _ctypes
import os as _os
import sys as _sys
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("fbnet_jax")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "unknown"

# XLA flags this project sets by default, each added to XLA_FLAGS unless XLA_FLAGS already names
# that flag, so any of them is overridden by giving it. XLA reads XLA_FLAGS when its first
# backend starts (the first computation), so they apply when fbnet_jax is imported before that.
XLA_DEFAULTS = (
    # CPU: XLA's own (Eigen) convolutions instead of YNNPACK's, which ran the small_cnn and
    # vgg_face train steps 1.1-1.2x slower on the 2-core AVX512 machine (BENCHMARKS.md, "XLA
    # CPU flags"). YNNPACK keeps its other fusions (its reductions help). Undo with
    # XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution.
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
)


def _with_xla_defaults(xla_flags: str) -> str:
    """`xla_flags` (an XLA_FLAGS value) with the defaults it does not set added."""
    given = {flag.split("=", 1)[0] for flag in xla_flags.split()}
    added = [flag for flag in XLA_DEFAULTS if flag.split("=", 1)[0] not in given]
    return " ".join([xla_flags.strip(), *added]).strip()


_os.environ["XLA_FLAGS"] = _with_xla_defaults(_os.environ.get("XLA_FLAGS", ""))

# XLA's CPU runtime allocates each run of a program's temporary buffer afresh (37 MB for the
# demo's train step, 485 MB for VGG-FACE's at 96 px, batch 16), and glibc serves allocations that
# size with mmap and returns them with munmap: every step then page-faults through its whole
# working memory, which the kernel zeroes again (about 9,500 faults a step for the demo's). With
# malloc's mmap off and its trim threshold high, a freed block stays in the heap for the next
# step. A thread's heap holds at most 64 MB before glibc falls back to mmap anyway, so
# single-device CPU programs also run on the calling thread (`set_jax_defaults`: synchronous
# dispatch), whose heap has no such bound. BENCHMARKS.md, "Page faults": the small_cnn step
# 1.2-1.35x, VGG-FACE's 1.1x. Each default yields to the user's own setting: a default of
# MALLOC_DEFAULTS is skipped when glibc's own variable for it (MALLOC_TRIM_THRESHOLD_,
# MALLOC_MMAP_MAX_, or the GLIBC_TUNABLES glibc.malloc.trim_threshold / mmap_max) is set, and
# FBNET_JAX_CPU_ASYNC_DISPATCH=1 keeps JAX's asynchronous dispatch.
MALLOC_DEFAULTS = {"M_TRIM_THRESHOLD": (1 << 31) - 1, "M_MMAP_MAX": 0}
# name -> (glibc's <malloc.h> number, its environment variable, its tunable)
_MALLOPT = {"M_TRIM_THRESHOLD": (-1, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
            "M_MMAP_MAX": (-4, "MALLOC_MMAP_MAX_", "glibc.malloc.mmap_max")}
CPU_ASYNC_DISPATCH_ENV = "FBNET_JAX_CPU_ASYNC_DISPATCH"
_SWITCH = {"1": True, "true": True, "yes": True, "on": True,
           "0": False, "false": False, "no": False, "off": False, "": False}


def _apply_malloc_defaults(environ) -> dict:
    """Sets the MALLOC_DEFAULTS the user has not set through glibc's mallopt; returns those set."""
    if not _sys.platform.startswith("linux"):
        return {}
    try:
        mallopt = _ctypes.CDLL(None).mallopt  # glibc's; other C libraries may have none
    except (OSError, AttributeError):
        return {}
    tunables = environ.get("GLIBC_TUNABLES", "")
    applied = {}
    for name, value in MALLOC_DEFAULTS.items():
        number, variable, tunable = _MALLOPT[name]
        if variable not in environ and tunable not in tunables and mallopt(number, value) == 1:
            applied[name] = value
    return applied


MALLOC_APPLIED = _apply_malloc_defaults(_os.environ)


def set_jax_defaults() -> None:
    """Synchronous dispatch for single-device CPU programs, unless FBNET_JAX_CPU_ASYNC_DISPATCH=1.

    Called when fbnet_jax.parallel is imported (before any device is used); it takes effect if
    no JAX backend has started yet. Multi-device programs are dispatched asynchronously either
    way (JAX's rule). Any other value of the variable than 1/0 (true/false, yes/no, on/off) is a
    UserError naming it.
    """
    value = _os.environ.get(CPU_ASYNC_DISPATCH_ENV, "")
    asynchronous = _SWITCH.get(value.strip().lower())
    if asynchronous is None:
        from fbnet_jax.errors import UserError  # pylint: disable=g-import-not-at-top
        raise UserError(f"{CPU_ASYNC_DISPATCH_ENV}={value!r}: expected 1 (keep JAX's "
                        f"asynchronous CPU dispatch) or 0 (the default, synchronous)")
    if not asynchronous:
        import jax  # pylint: disable=g-import-not-at-top
        jax.config.update("jax_cpu_enable_async_dispatch", False)


def __getattr__(name):
    # Imported on first use, so that `import fbnet_jax` (and `fbnet --help`) stays light.
    if name == "Predictor":
        from fbnet_jax.predict import Predictor  # pylint: disable=g-import-not-at-top
        return Predictor
    raise AttributeError(f"module 'fbnet_jax' has no attribute {name!r}")
