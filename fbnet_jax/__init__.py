"""FaceBehaviorNet in JAX. `fbnet_jax.Predictor` runs a trained network (fbnet_jax/predict.py).

Importing the package sets the project's XLA defaults (`XLA_DEFAULTS`) in the environment, for
the XLA backends that start after it.
"""

import os as _os
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


def __getattr__(name):
    # Imported on first use, so that `import fbnet_jax` (and `fbnet --help`) stays light.
    if name == "Predictor":
        from fbnet_jax.predict import Predictor  # pylint: disable=g-import-not-at-top
        return Predictor
    raise AttributeError(f"module 'fbnet_jax' has no attribute {name!r}")
