"""The XLA flags `import fbnet_jax` sets by default (fbnet_jax.XLA_DEFAULTS)."""

import os
import subprocess
import sys

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
