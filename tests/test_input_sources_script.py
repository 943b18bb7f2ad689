"""benchmarks/input_sources.py: one small round over the six face formats."""

import os
import re
import subprocess
import sys

from conftest import REPO


def test_input_sources_times_every_format(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "input_sources.py"), "--images", "12",
         "--width", "160", "--height", "120", "--image_size", "32", "--batches", "1",
         "--repeats", "1", "--target", "1000", "--synthetic_records", "100", "--render_processes", "2",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"12 JPEG scenes 160x120, one face box each; train split \d+ records; "
                        r"prepared png in [\d.]+ s, uint8 in [\d.]+ s", lines[0]), lines[0]
    # Every split of the source: 100 train, 200 validation and 400 test faces (the config's),
    # too few to spawn a second process for.
    assert re.fullmatch(r"render_cache: every split of the synthetic source, 700 faces, "
                        r"rendered ahead in [\d.]+ s by 1 process\(es\): \d+ faces/s",
                        lines[1]), lines[1]
    assert lines[2].startswith("storage, MB per 1000 images: jpeg ")
    rows = [line.split(" | ") for line in lines if line.startswith("| ") and "---" not in line]
    assert rows[0][0] == "| format" and rows[0][-1] == "cores for 1,000 ex/s |"
    assert [row[0] for row in rows[1:]] == ["| jpeg", "| png", "| uint8", "| synthetic",
                                            "| cached", "| render_cache"]
    assert len(list((tmp_path / "render_cache").glob("faces.*.*/images.npy"))) == 3
    assert all(row[2] == "1.00" and row[4] == "1.00" for row in rows[1:2])  # jpeg / jpeg
    # The uint8 copy at the training size was written: raw 32x32x3 faces.
    assert any(p.parent.parent.name.startswith("image_size-32-")
               for p in (tmp_path / "prepared").rglob("features.json"))
