"""What each process loads and places: its rows of a global batch on the mesh, and runs of several processes
(one per host) that share one mesh.

Several hosts: start one process per host with `initialize_distributed(...)` (or the variables
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`) before anything else touches JAX; each
process loads only its rows of every global batch (`local_batch_rows`, the `rows` of
`cait_eqx.data.TrainPipeline`) and passes them with `shard_batch(..., local=True)`; `to_host` gathers a
sharded state for one process (`is_primary()`) to write.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from jaxtyping import PyTree

from ._mesh import MeshError, batch_sharding, check_batch_size, num_batch_shards

__all__ = [
    "initialize_distributed",
    "is_primary",
    "local_batch_rows",
    "shard_batch",
]

_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"


# ---------------------------------------------------------------------------------------------------------
# Batches


def local_batch_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of each global batch that this process's devices hold: what this process has to load.

    **Arguments:**

    - `mesh`: the mesh.
    - `global_batch`: examples per step over all processes (must split evenly, see `check_batch_size`).

    **Returns:** a `slice` of the global batch (all of it with one process).
    """
    check_batch_size(global_batch, mesh)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    ranges = sorted({(index[0].start or 0, global_batch if index[0].stop is None else index[0].stop)
                     for index in index_map.values()})
    start, stop = ranges[0][0], ranges[0][0]
    for lo, hi in ranges:
        if lo != stop:
            raise MeshError(
                f"This process's devices hold non-contiguous rows {ranges} of the batch; build the mesh with "
                f"`make_mesh` (which keeps each process's devices together)."
            )
        stop = hi
    return slice(start, stop)


def shard_batch(batch: PyTree, mesh: Mesh, *, local: bool = False) -> PyTree:
    """Place a batch on `mesh`, its leading axis split over `data × fsdp`.

    **Arguments:**

    - `batch`: a PyTree of arrays (e.g. `(images, labels)`) sharing their leading batch axis; NumPy or JAX.
    - `mesh`: the mesh.
    - `local`: `False`: `batch` is the whole global batch (identical on every process; each process keeps
        only its rows). `True`: `batch` holds only this process's rows, `batch[local_batch_rows(...)]` of the
        global batch, as `TrainPipeline(..., rows=local_batch_rows(...))` loads them. (Keyword only
        argument.)

    **Returns:** the batch as global `jax.Array`s with `batch_sharding(mesh)`.

    **Raises:** `MeshError` if the global batch does not split evenly over the mesh.
    """
    leaves = jax.tree.leaves(batch)
    if not leaves:
        return batch
    sharding = batch_sharding(mesh)
    rows = len(leaves[0])
    if local:
        local_shards = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
        global_rows = rows * num_batch_shards(mesh) // max(local_shards, 1)
        if rows % max(local_shards, 1):
            raise MeshError(
                f"This process's part of the batch has {rows} rows, which does not split over its "
                f"{local_shards} devices; load `local_batch_rows(mesh, global_batch)` of each global batch."
            )
    else:
        global_rows = rows
    check_batch_size(global_rows, mesh)
    take = slice(None) if local else local_batch_rows(mesh, global_rows)

    def one(x):
        if len(x) != rows:
            raise MeshError(f"The arrays of a batch must share their leading size; got {rows} and {len(x)}.")
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(x)[take]
        return jax.make_array_from_process_local_data(sharding, host, (global_rows, *host.shape[1:]))

    return jax.tree.map(one, batch)


# ---------------------------------------------------------------------------------------------------------
# Several processes


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"The environment variable {name} must be an integer, got {value!r}.") from None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    timeout_s: int = 300,
) -> bool:
    """Join a multi-process JAX run (`jax.distributed.initialize`), from arguments or the environment.

    Call it first, before anything else uses JAX. Each process then sees every process's devices in
    `jax.devices()` and a mesh over all of them (`make_mesh`) spans the hosts.

    **Arguments:**

    - `coordinator_address`: `"host:port"` of process 0, reachable by all (default:
        `$JAX_COORDINATOR_ADDRESS`).
    - `num_processes`: how many processes take part (default: `$JAX_NUM_PROCESSES`).
    - `process_id`: this process's number, `0 ≤ id < num_processes` (default: `$JAX_PROCESS_ID`).
    - `local_device_ids`: restrict this process to these local devices (default: all).
        (Keyword only argument.)
    - `timeout_s`: how long to wait for the other processes, in seconds. (Keyword only argument.)

    **Returns:** `True` if a multi-process run was joined; `False` if none of the three settings is given
    (one process, nothing done).
    """
    if coordinator_address is None:
        coordinator_address = os.environ.get(_ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(_ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(_ENV_PROCESS_ID)
    given = {"coordinator address": coordinator_address, "number of processes": num_processes,
             "process id": process_id}
    if all(value is None for value in given.values()):
        return False
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise ValueError(
            f"A multi-process run needs the coordinator address, the number of processes and this process's "
            f"id; missing: {', '.join(missing)}. Pass `coordinator_address` (HOST:PORT), `num_processes` and "
            f"`process_id`, or set {_ENV_COORDINATOR}, {_ENV_NUM_PROCESSES} and {_ENV_PROCESS_ID}."
        )
    assert num_processes is not None and process_id is not None
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"The process id must be in [0, {num_processes}) for {num_processes} processes, got {process_id}."
        )
    if ":" not in coordinator_address:
        raise ValueError(f"The coordinator address must be HOST:PORT, got {coordinator_address!r}.")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=None if local_device_ids is None else list(local_device_ids),
        initialization_timeout=timeout_s,
    )
    return True


def is_primary() -> bool:
    """Whether this is process 0, the one that logs and writes files in a multi-process run."""
    return jax.process_index() == 0
