"""The process settings `fbnet` runs with: XLA flags, glibc malloc settings and CPU dispatch.

`apply()` sets them; nothing sets them at import. The `fbnet` command calls it first thing and
the benchmarks call it before they time anything; a script or notebook that uses the Python API
(`fbnet_jax.Predictor`, `train.train_and_evaluate`) calls it itself, before JAX runs its first
computation, to get the speed `fbnet` gets. Each setting yields to the user's own setting of it.

This module imports nothing heavy: JAX only inside `apply()`, when it sets the dispatch mode.
"""

import ctypes
import os
import sys

from fbnet_jax.core.errors import UserError

# XLA flags this project sets by default, each added to XLA_FLAGS unless XLA_FLAGS already names
# that flag, so any of them is overridden by giving it. XLA reads XLA_FLAGS when its first
# backend starts (the first computation), so they apply when `apply()` runs before that.
XLA_DEFAULTS = (
    # CPU: XLA's own (Eigen) convolutions instead of YNNPACK's, which ran the small_cnn and
    # vgg_face train steps 1.1-1.2x slower on the 2-core AVX512 machine (see
    # docs/benchmarks-history.md#where-the-steps-time-goes-and-ynnpacks-convolutions-2026-11-29-kept-as-the-default).
    # YNNPACK keeps its other fusions (its reductions help). Undo with
    # XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution.
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
)

# XLA's CPU runtime allocates each run of a program's temporary buffer afresh (37 MB for the
# demo's train step, 485 MB for VGG-FACE's at 96 px, batch 16), and glibc serves allocations that
# size with mmap and returns them with munmap: every step then page-faults through its whole
# working memory, which the kernel zeroes again (about 9,500 faults a step for the demo's). With
# malloc's mmap off and its trim threshold high, a freed block stays in the heap for the next
# step. A thread's heap holds at most 64 MB before glibc falls back to mmap anyway, so
# single-device CPU programs also run on the calling thread (synchronous dispatch, set by
# `apply`), whose heap has no such bound. The small_cnn step 1.2-1.35x, VGG-FACE's 1.1x:
# docs/benchmarks-history.md#page-faults-every-steps-memory-mapped-afresh-2026-11-29-kept-as-the-default.
# Each default yields to the user's own setting: a default of
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


def apply() -> dict[str, int]:
    """Sets the runtime defaults in this process; call it before JAX starts a backend.

    Adds XLA_DEFAULTS to XLA_FLAGS, sets MALLOC_DEFAULTS through glibc's mallopt, and makes
    single-device CPU programs dispatch synchronously, each unless the user set it (module
    comments). Settings made after a backend started do not reach it. Calling it again changes
    nothing more.

    Returns:
      The malloc settings made (those of MALLOC_DEFAULTS the user did not set; none off glibc).

    Raises:
      UserError: FBNET_JAX_CPU_ASYNC_DISPATCH is neither 1 nor 0 (nor true/false, yes/no,
        on/off); nothing was set.
    """
    asynchronous = _cpu_async_dispatch(os.environ)
    os.environ["XLA_FLAGS"] = _with_xla_defaults(os.environ.get("XLA_FLAGS", ""))
    applied = _apply_malloc_defaults(os.environ)
    if not asynchronous:
        import jax  # pylint: disable=g-import-not-at-top  # heavy; only when it is needed
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    return applied


def _with_xla_defaults(xla_flags: str) -> str:
    """`xla_flags` (an XLA_FLAGS value) with the defaults it does not set added."""
    given = {flag.split("=", 1)[0] for flag in xla_flags.split()}
    added = [flag for flag in XLA_DEFAULTS if flag.split("=", 1)[0] not in given]
    return " ".join([xla_flags.strip(), *added]).strip()


def _apply_malloc_defaults(environ) -> dict[str, int]:
    """Sets the MALLOC_DEFAULTS the user has not set through glibc's mallopt; returns those set."""
    if not sys.platform.startswith("linux"):
        return {}
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc's; other C libraries may have none
    except (OSError, AttributeError):
        return {}
    tunables = environ.get("GLIBC_TUNABLES", "")
    applied = {}
    for name, value in MALLOC_DEFAULTS.items():
        number, variable, tunable = _MALLOPT[name]
        if variable not in environ and tunable not in tunables and mallopt(number, value) == 1:
            applied[name] = value
    return applied


def _cpu_async_dispatch(environ) -> bool:
    """Whether FBNET_JAX_CPU_ASYNC_DISPATCH keeps JAX's asynchronous CPU dispatch (default: no).

    Multi-device programs are dispatched asynchronously either way (JAX's rule).
    """
    value = environ.get(CPU_ASYNC_DISPATCH_ENV, "")
    asynchronous = _SWITCH.get(value.strip().lower())
    if asynchronous is None:
        raise UserError(f"{CPU_ASYNC_DISPATCH_ENV}={value!r}: expected 1 (keep JAX's "
                        f"asynchronous CPU dispatch) or 0 (the default, synchronous)")
    return asynchronous
