"""benchmarks/end_to_end.py: one small round of fbnet train from a uint8 store and the render
cache, beside the bare step."""

import os
import re
import subprocess
import sys

from conftest import REPO


def test_end_to_end_times_both_inputs_against_the_bare_step(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "end_to_end.py"), "--images", "20",
         "--image_size", "16", "--batch", "8", "--steps", "6", "--log_every", "2",
         "--bare_steps", "1", "--repeats", "1", "--synthetic_config", "synthetic:tiny",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == ("small_cnn float32, 16 px, batch 8; fbnet train: 6 steps, 0 worker(s), "
                        "median of the logged intervals after the first; 1 rounds")
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| input | examples/s (median) | per round | / bare step (per round) |"
    pattern = r"\| {} \| \d+ \| \d+ \| \d+\.\d\d \|"
    assert re.fullmatch(pattern.format(r"bare step \(batch on the device\)"), rows[1]), rows[1]
    assert re.fullmatch(pattern.format("fbnet train, prepared uint8 store"), rows[2]), rows[2]
    assert re.fullmatch(pattern.format("fbnet train, render cache"), rows[3]), rows[3]
    # The runs stopped where asked, each in its own work directory; the store was prepared at
    # the training size and the faces rendered into the render cache.
    for name in ("uint8", "render_cache"):
        assert "stopped at step 6 of 60" in (tmp_path / f"run-small_cnn-{name}-0" / "train.log").read_text()
    assert any(p.parent.parent.name.startswith("image_size-16-")
               for p in (tmp_path / "prepared").rglob("features.json"))
    assert list((tmp_path / "render_cache").glob("*/images.npy"))
