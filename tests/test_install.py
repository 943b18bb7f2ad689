"""fbnet_jax installed from its wheel (not the source tree) runs from any directory."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE_DIRS = {"fbnet_jax": "fbnet_jax", "data_pipelines": "data_pipelines",
                "configs": "fbnet_jax/configs"}


def _checkout(dest):
    """The repository's files as a clean clone has them (no build/ or .venv left-overs)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project's wheel installed into an isolated folder (its dependencies: this venv's)."""
    root = tmp_path_factory.mktemp("install")
    source = _checkout(root / "src")  # building in the repository would leave build/ there
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w",
                    str(root / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (root / "dist").glob("fbnet_jax-*.whl")
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    return target


def _run(target, cwd, *args):
    # PYTHONPATH puts the installed copy first; cwd is outside the repository.
    env = dict(os.environ, PYTHONPATH=str(target))
    env.pop("FBNET_DEBUG", None)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def test_the_wheel_ships_every_module_and_config(installed):
    for source, shipped in PACKAGE_DIRS.items():
        expected = sorted(p.relative_to(REPO / source).as_posix()
                          for p in (REPO / source).rglob("*.py"))
        shipped_files = [p.relative_to(installed / shipped).as_posix()
                         for p in (installed / shipped).rglob("*.py")]
        if source == "fbnet_jax":  # the configs ship inside it, checked as "configs"
            shipped_files = [f for f in shipped_files if not f.startswith("configs/")]
        assert sorted(shipped_files) == expected, source


def test_the_installed_command_trains_from_another_directory(installed, tmp_path):
    where = _run(installed, tmp_path, sys.executable, "-c",
                 "import fbnet_jax, fbnet_jax.core.config_files as c, data_pipelines.sources as s, "
                 "data_pipelines.tfds_builders as t; print(fbnet_jax.__file__); "
                 "print(c.packaged_dir()); print(s.__file__); print(t.__file__)")
    module_file, config_dir, *subpackages = where.stdout.split()
    # This venv's editable install would otherwise supply what the wheel lacks.
    for path in (module_file, *subpackages):
        assert Path(path).is_relative_to(installed), where.stdout
    assert Path(config_dir) == installed / "fbnet_jax" / "configs"
    fbnet = installed / "bin" / "fbnet"
    # The second run renders its faces ahead into a relative folder with two spawned
    # processes, which import the generator from the wheel too.
    render = ["--config.data.render_cache_dir=faces", "--config.data.render_processes=2",
              "--config.data.sources.affwild2_like.synthetic.num_records=4000"]
    for name, extra in (("synthetic:tiny", []), ("configs/synthetic.py:tiny", render)):
        result = _run(installed, tmp_path, str(fbnet), "train", "--config", name,
                      "--workdir", f"runs/{name.split(':')[0].replace('/', '_')}",
                      "--config.train.num_steps=2", "--config.evals.validation.every=0", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "rendered 9 (4920 faces, 15 MB)" in result.stderr + result.stdout
    assert "with 2 process(es)" in result.stderr + result.stdout
    assert len(list((tmp_path / "faces").glob("*/images.npy"))) == 9
    assert (tmp_path / "runs" / "synthetic" / "metrics.json").exists()
    assert (tmp_path / "runs" / "configs_synthetic.py" / "metrics.json").exists()
