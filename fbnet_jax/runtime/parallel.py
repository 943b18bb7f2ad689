"""Devices, shardings, global batches and the two ways of compiling the data-parallel step.

One mesh axis, "data", over every device of every process. Batches are sharded along it,
parameters and optimizer state are replicated. `config.parallel.mode` picks how the step is
compiled (docs/design.md#runtime):

- "jit" (default): `jax.jit` of the step written for the global batch; XLA inserts the
  collectives, so losses written as ratios of global sums are exact for any number of devices.
- "pmap": `jax.pmap(axis_name="data")` over this process's devices; the losses `psum` their sums
  over the axis, gradients are `pmean`-ed, BatchNorm averages its statistics over the axis. The
  state then lives in pmap's layout (a leading axis of one copy per local device) between steps.

Both layouts meet in one place: checkpoints, evaluation and the non-finite check always see the
jit layout (one replicated global array per leaf), so a checkpoint written in one mode restores
in the other. `StepRunner` hides the difference from the training loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fbnet_jax.core import checks

DATA_AXIS = "data"
MODES = ("jit", "pmap")

log = logging.getLogger(__name__)


def detected_cluster() -> str | None:
    """The multi-process launcher this process runs under, when `jax.distributed.initialize()`
    can find everything by itself: "SLURM" (srun with more than one task) or "Cloud TPU"
    (a TPU VM: one process per host of the slice). None otherwise."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID")
    if all(name in os.environ for name in slurm) and int(os.environ["SLURM_NTASKS"]) > 1:
        return "SLURM"
    if any(os.environ.get(name) for name in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                                               "CLOUD_TPU_TASK_ID")):
        return "Cloud TPU"
    return None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> str | None:
    """Joins this process to a multi-process JAX runtime; call before anything uses a device.

    With the three arguments, process `process_id` of `num_processes` connects to the
    coordinator at `coordinator_address` (HOST:PORT; process 0 serves it). Without any, the
    runtime is started when `detected_cluster()` finds a launcher (SLURM, Cloud TPU), else
    this stays a single process.

    Returns:
      A line saying what was started, or None for a single process.

    Raises:
      ValueError: some but not all of the three arguments, or a process id out of range.
    """
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
             "--process_id": process_id}
    if any(v is not None for v in given.values()):
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} missing: a multi-process run needs "
                             f"--coordinator_address, --num_processes and --process_id")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id {process_id} is not in 0..{num_processes - 1} "
                             f"(--num_processes {num_processes})")
        if ":" not in coordinator_address:
            raise ValueError(f"--coordinator_address {coordinator_address!r} must be HOST:PORT")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
        return (f"process {process_id} of {num_processes} joined the coordinator at "
                f"{coordinator_address}")
    cluster = detected_cluster()
    if cluster is None:
        return None
    jax.distributed.initialize()
    return (f"{cluster} detected: process {jax.process_index()} of {jax.process_count()} "
            f"started")


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any (a collective: every process calls it
    at the same point)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(int(bool(flag)), np.int32))))


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


def to_pmap_layout(state: Any) -> Any:
    """A replicated (jit-layout) pytree as pmap's: leaves [num_local_devices, ...], one copy each.

    Each process stacks its own local copy, which is the full value of a replicated array.
    """
    devices = jax.local_devices()
    sharding = NamedSharding(Mesh(np.asarray(devices), (DATA_AXIS,)), P(DATA_AXIS))

    def stack(x):
        local = x.addressable_data(0) if isinstance(x, jax.Array) else np.asarray(x)
        copies = [jax.device_put(local[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices), *local.shape), sharding,
                                                        copies)
    return jax.tree.map(stack, state)


def from_pmap_layout(state: Any, mesh: Mesh) -> Any:
    """pmap's layout back to replicated global arrays on `mesh`, without copying: device d's
    copy becomes device d's shard of the replicated array."""
    sharding = replicated(mesh)

    def unstack(x):
        shards = [s.data.reshape(x.shape[1:]) for s in x.addressable_shards]
        return jax.make_array_from_single_device_arrays(x.shape[1:], sharding, shards)
    return jax.tree.map(unstack, state)


def pmap_batch(local_batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """This process's rows split into one block per local device: [n_local, rows / n_local, ...].

    Host-only fields (strings) are dropped.
    """
    n = jax.local_device_count()
    out = {}
    for name, value in local_batch.items():
        if is_device_field(value):
            value = np.asarray(value)
            if value.shape[0] % n:
                raise ValueError(f"a batch of {value.shape[0]} rows does not split over {n} "
                                 f"local devices")
            out[name] = value.reshape(n, value.shape[0] // n, *value.shape[1:])
    return out


class StepRunner:
    """Compiles the step in `mode` and runs it on the loop's batches.

    The loop keeps the state in `runner.layout(state)` between steps and asks for the jit layout
    (`runner.global_state(state)`) only to checkpoint or evaluate it. Step metrics come back as
    plain (replicated) arrays in both modes.
    """

    def __init__(self, step_fn, mode: str, mesh: Mesh):
        if mode not in MODES:
            raise ValueError(f"unknown parallel.mode {mode!r}; known: {MODES}")
        self.mode, self.mesh = mode, mesh
        if mode == "jit":
            self._step = jax.jit(step_fn, donate_argnums=0,
                                 out_shardings=(replicated(mesh), replicated(mesh)))
        else:
            # Metrics are psum/pmean-ed, the same on every device: returned once (out_axes None).
            self._step = jax.pmap(step_fn, axis_name=DATA_AXIS, donate_argnums=0,
                                  out_axes=(0, None))
        self.compiled = None

    def layout(self, state: Any) -> Any:
        """The state (jit layout) in the layout the step takes."""
        return to_pmap_layout(state) if self.mode == "pmap" else state

    def global_state(self, state: Any) -> Any:
        """The step's state in the jit layout, for checkpoints and evaluation."""
        return from_pmap_layout(state, self.mesh) if self.mode == "pmap" else state

    def batch(self, local_batch: Mapping[str, Any]) -> dict[str, Any]:
        """This process's rows, placed as the step takes them."""
        if self.mode == "pmap":
            return pmap_batch(local_batch)
        return global_batch(local_batch, self.mesh)

    def compile(self, state: Any, batch: Mapping[str, Any]):
        """Compiles ahead of the first call (to time it and read its memory analysis)."""
        self.compiled = self._step.lower(state, batch).compile()
        return self.compiled

    def __call__(self, state: Any, batch: Mapping[str, Any]):
        return (self.compiled or self._step)(state, batch)


def problems(config, num_devices: int) -> list[str]:
    """The step's compilation mode, and a batch that splits into microbatches on every device."""
    out: list[str] = []
    checks.one_of(out, "parallel.mode", config.parallel.mode, MODES)
    k, batch = config.train.grad_accum_steps, config.data.global_batch_size
    if (isinstance(k, int) and k > 1 and isinstance(batch, int) and batch > 0
            and batch % (num_devices * k)):
        out.append(f"train.grad_accum_steps: {k} microbatches of the "
                   f"data.global_batch_size {batch} do not split evenly over the "
                   f"{num_devices} devices; make the batch a multiple of {num_devices * k}")
    return out
