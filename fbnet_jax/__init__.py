"""FaceBehaviorNet in JAX. `fbnet_jax.Predictor` runs a trained network (serve/predict.py).

Importing the package changes nothing in the process. The XLA flags, malloc settings and CPU
dispatch mode that `fbnet` runs with are set by `fbnet_jax.core.runtime_defaults.apply()`, which a
script or notebook calls itself (before JAX's first computation) to run as fast as `fbnet`.
"""

from fbnet_jax.core.version import __version__


def __getattr__(name):
    # Imported on first use, so that `import fbnet_jax` (and `fbnet --help`) stays light.
    if name == "Predictor":
        from fbnet_jax.serve.predict import Predictor  # pylint: disable=g-import-not-at-top
        return Predictor
    raise AttributeError(f"module 'fbnet_jax' has no attribute {name!r}")
