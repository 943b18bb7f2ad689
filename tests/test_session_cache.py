"""The test session's shared JAX compilation cache (set up in tests/conftest.py)."""

import os
from pathlib import Path

import jax
import pytest

from conftest import COMPILATION_CACHE_MAX_SIZE, COMPILATION_CACHE_PREFIX


def test_the_session_compiles_into_one_shared_cache_with_its_lock_on():
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    assert path is not None, "tests/conftest.py sets JAX_COMPILATION_CACHE_DIR for the session"
    if not path:
        pytest.skip("JAX_COMPILATION_CACHE_DIR is set empty: this session compiles uncached")
    # JAX read the variable when imported, so it was imported after conftest set it.
    assert jax.config.jax_compilation_cache_dir == path
    if Path(path).name.startswith(COMPILATION_CACHE_PREFIX):  # conftest's own
        assert Path(path).is_dir()
        assert jax.config.jax_compilation_cache_max_size == COMPILATION_CACHE_MAX_SIZE
