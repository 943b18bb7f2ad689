"""benchmarks/gpu.sh: it measures on a GPU only, and says so elsewhere."""

import os
import subprocess
import sys

from conftest import REPO


def test_gpu_script_refuses_a_machine_without_a_gpu():
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh")], capture_output=True,
                            text=True, timeout=120, check=False,
                            env=dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "benchmarks/gpu.sh needs a GPU; JAX sees [CpuDevice(id=0)]")
    assert "train step" not in result.stdout   # nothing was timed
