"""What each process loads and places: its rows of a global batch on the mesh, and runs of several processes
(one per host) that share one mesh.

Several hosts: start one process per host with `initialize_distributed(...)` (or the variables
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; or under a scheduler JAX recognises, such
as SLURM's `srun`, with nothing: `detect_cluster`) before anything else touches JAX; each
process loads only its rows of every global batch (`local_batch_rows`, the `rows` of
`cait_eqx.data.TrainPipeline`) and passes them with `shard_batch(..., local=True)`; `to_host` gathers a
sharded state for one process (`is_primary()`) to write.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh
from jaxtyping import PyTree

from ._mesh import MeshError, batch_sharding, check_batch_size, num_batch_shards

__all__ = [
    "ClusterSettings",
    "detect_cluster",
    "initialize_distributed",
    "is_primary",
    "local_batch_rows",
    "shard_batch",
]

_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"

logger = logging.getLogger("cait_eqx")


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


class ClusterSettings(NamedTuple):
    """What `detect_cluster` read from a scheduler's environment: JAX's `jax.distributed.initialize`
    arguments (`local_device_ids`: `None` = every local device) and the scheduler's `name` (`"slurm"`,
    `"ompi"`, ...)."""

    name: str
    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None


def detect_cluster(*, timeout_s: int = 300) -> ClusterSettings | None:
    """The multi-process run a cluster scheduler started this process in, as JAX's own detection reads it.

    JAX recognises SLURM (`srun`), Open MPI (`mpirun`), Kubernetes (with `jax[k8s]`) and Cloud TPU pods
    (`jax.distributed.initialize()` with no arguments uses the same detection): the number of processes,
    this one's id, process 0's address (for SLURM: the first host of the step, and a port derived from the
    job id, or `$JAX_COORDINATOR_PORT`) and, for one process per device, this process's device.

    **Arguments:**

    - `timeout_s`: how long a detection that asks a service (a TPU pod's) may wait. (Keyword only argument.)

    **Returns:** the `ClusterSettings`, or `None` when no scheduler JAX knows started several processes
    (none, or one task: a single process needs no distributed runtime).
    """
    said: list[warnings.WarningMessage] = []
    try:
        from jax._src import clusters  # JAX's detection; no public name for it yet (jax 0.5 to 0.10)

        # Kubernetes without `jax[k8s]` warns at every detection, also in a single pod: told at INFO level.
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            env = next((e for e in clusters.ClusterEnv._cluster_types if _present(e)), None)
            if env is None or env.get_process_count() < 2:  # a single task: nothing to join
                return None
            address, count, rank, devices = clusters.ClusterEnv.auto_detect_unset_distributed_params(
                None, None, None, None, None, timeout_s
            )
    except (ImportError, AttributeError, TypeError) as error:  # another JAX: say so, and run as one process
        logger.warning("cait_eqx: JAX's cluster detection is not available (%s); pass the settings", error)
        return None
    finally:
        for warning in said:
            logger.info("cait_eqx: %s", warning.message)
    if address is None or count is None or rank is None:
        return None
    devices = None if devices is None else tuple(int(d) for d in devices)
    return ClusterSettings(env.name or env.__name__, address, int(count), int(rank), devices)


def _present(env) -> bool:
    return not env.opt_in_only_method and env.is_env_present()


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    timeout_s: int = 300,
) -> bool:
    """Join a multi-process JAX run (`jax.distributed.initialize`): from arguments, the environment, or the
    cluster scheduler that started this process.

    Call it first, before anything else uses JAX. Each process then sees every process's devices in
    `jax.devices()` and a mesh over all of them (`make_mesh`) spans the hosts. Where the settings come from,
    first found first:

    1. the arguments, or `$JAX_COORDINATOR_ADDRESS`, `$JAX_NUM_PROCESSES`, `$JAX_PROCESS_ID` (the last two
        are cait_eqx's names; JAX reads only the first): all three, or none;
    2. a scheduler JAX recognises that started several processes (`detect_cluster`: `srun` under SLURM,
        `mpirun` of Open MPI, Kubernetes, Cloud TPU pods), so `srun -n 4 cait-eqx train ...` needs no flag;
    3. nothing: one process, and nothing is done (no distributed runtime is started).

    **Arguments:**

    - `coordinator_address`: `"host:port"` of process 0, reachable by all (default:
        `$JAX_COORDINATOR_ADDRESS`).
    - `num_processes`: how many processes take part (default: `$JAX_NUM_PROCESSES`).
    - `process_id`: this process's number, `0 ≤ id < num_processes` (default: `$JAX_PROCESS_ID`).
    - `local_device_ids`: restrict this process to these local devices (default: all, or the scheduler's
        one device per process as JAX assigns it). (Keyword only argument.)
    - `timeout_s`: how long to wait for the other processes, in seconds. (Keyword only argument.)

    **Returns:** `True` if a multi-process run was joined; `False` for one process (nothing done).

    **Raises:** `ValueError` for settings given in part, or inconsistent.
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
        cluster = detect_cluster(timeout_s=timeout_s)
        if cluster is None:
            return False
        logger.info(
            "cait_eqx: %s started %d processes; this is process %d, coordinator %s", cluster.name,
            cluster.num_processes, cluster.process_id, cluster.coordinator_address,
        )
        coordinator_address, num_processes, process_id = cluster[1:4]
        if local_device_ids is None:
            local_device_ids = cluster.local_device_ids
    else:
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ValueError(
                f"A multi-process run needs the coordinator address, the number of processes and this "
                f"process's id; missing: {', '.join(missing)}. Pass `coordinator_address` (HOST:PORT), "
                f"`num_processes` and `process_id`, or set {_ENV_COORDINATOR}, {_ENV_NUM_PROCESSES} and "
                f"{_ENV_PROCESS_ID}; or, under SLURM's srun or Open MPI's mpirun, none of them (the "
                f"scheduler's settings are read)."
            )
    assert coordinator_address is not None and num_processes is not None and process_id is not None
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
