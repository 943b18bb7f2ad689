"""Devices, shardings and global batches for data-parallel training with `jax.jit`.

One mesh axis, "data", over every device of every process. Batches are sharded along it,
parameters and optimizer state are replicated. Under `jax.jit` the step is written for the global
batch and XLA inserts the collectives, so losses written as ratios of global sums are exact for any
number of devices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def create_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full value on every device."""
    return NamedSharding(mesh, P())


def is_device_field(value: Any) -> bool:
    """Numeric arrays go to the devices; strings (example keys) stay on the host."""
    return np.asarray(value).dtype.kind in "biuf"


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's part of a batch into global arrays sharded over "data".

    Every process passes its own rows (the per-process batch); the result has the global batch
    size. Host-only fields (strings) are dropped.
    """
    sharding = data_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in local_batch.items() if is_device_field(value)}


def to_host(tree: Any) -> Any:
    """Fetches a pytree of (possibly sharded, multi-process) arrays as numpy arrays.

    Fully replicated arrays are read from the local copy; sharded ones are gathered from every
    process first.
    """
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(fetch, tree)
