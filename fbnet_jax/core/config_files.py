"""Finding and loading experiment config files (`--config FILE[:VARIANT]`).

A config is a Python file defining `get_config(arg)`; `FILE:VARIANT` calls `get_config(VARIANT)`
(plain `FILE`: `get_config()`). FILE is a path, tried first as given (relative to the current
directory), else the name of a config shipped with the package (the repository's `configs/`,
installed as `fbnet_jax.configs`): `synthetic`, `synthetic.py` and `configs/synthetic.py` all name
the embedded synthetic experiment, from any directory and in any install.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import ml_collections

from fbnet_jax.core.errors import UserError

DEFAULT = "synthetic.py"


def packaged_dir() -> Path:
    """The folder of the shipped configs: installed as fbnet_jax.configs, or the source tree's."""
    spec = importlib.util.find_spec("fbnet_jax.configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[1] / "configs"  # a source tree that is not installed


def packaged() -> list[str]:
    """File names of the shipped configs."""
    return sorted(p.name for p in packaged_dir().glob("*.py") if not p.name.startswith("_"))


def split_spec(spec: str) -> tuple[str, str | None]:
    """`FILE[:VARIANT]` -> (FILE, VARIANT or None)."""
    path, sep, variant = spec.rpartition(":")
    if not sep or re.search(r"[\\/]", variant):  # no variant (a ':' inside a path is not one)
        return spec, None
    return path, variant


def resolve(path: str) -> Path:
    """The config file FILE names (see the module docstring).

    Raises:
      UserError: neither a file nor a shipped config of that name.
    """
    given = Path(path).expanduser()
    if given.is_file():
        return given.resolve()
    name = given.name if given.suffix == ".py" else f"{given.name}.py"
    bare = len(given.parts) == 1 or (len(given.parts) == 2 and given.parts[0] == "configs")
    shipped = packaged_dir() / name
    if bare and shipped.is_file():
        return shipped
    raise UserError(f"--config {path}: no such file, and not a config shipped with fbnet_jax "
                    f"(those are: {', '.join(packaged())})")


def load(spec: str) -> ml_collections.ConfigDict:
    """Loads `FILE[:VARIANT]` and returns its config, locked (unknown fields fail).

    Raises:
      UserError: no such file, or the file fails to load or rejects the variant; the message
        names the file and the error.
    """
    path, variant = split_spec(spec)
    file = resolve(path)
    module_spec = importlib.util.spec_from_file_location(f"fbnet_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # pylint: disable=broad-except  # the config file's own error
        raise UserError(f"--config {spec}: {file} fails to load: {type(e).__name__}: {e}") from e
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"--config {spec}: {file} defines no get_config()")
    try:
        config = module.get_config(variant) if variant is not None else module.get_config()
    except Exception as e:  # pylint: disable=broad-except  # e.g. an unknown variant
        raise UserError(f"--config {spec}: {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"--config {spec}: get_config() of {file} returned a "
                        f"{type(config).__name__}, not an ml_collections.ConfigDict")
    config.lock()
    return config
