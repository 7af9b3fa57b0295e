"""Data-parallel and parameter-sharded training on a `jax.sharding` mesh, from one device to many hosts.

One mesh with two named axes carries everything:

- `data`: data parallelism. Every device along it holds the parameters its `fsdp` group holds and works
    on its own slice of the batch.
- `fsdp`: fully-sharded data parallelism. Large parameter arrays (and the optimiser state that mirrors
    them) are split along this axis, so each device stores only `1/fsdp` of them; the batch is split over
    this axis too, so the devices of an `fsdp` group still work on different examples.

The batch is split along its leading axis over `data × fsdp` (every device gets `batch / (data · fsdp)`
examples). Which parameters are split, and along which axis, is a rule over names and shapes
(`partition_spec`). There is no hand-written communication: the step is the ordinary pure training step,
compiled once with `eqx.filter_jit` under sharding constraints (`eqx.filter_shard`), and XLA inserts the
all-gathers and reduce-scatters. One device is the same code with a mesh of one device.

```python
import cait_eqx, jax
from cait_eqx import parallel

mesh = parallel.make_mesh(data=4, fsdp=2)                # or parallel.mesh_from_spec("data=4,fsdp=2")
model, opt_state = parallel.shard_state((model, opt_state), mesh)
step = parallel.make_sharded_train_step(optim, step_config, mesh)
model, opt_state, metrics = step(model, opt_state, (images, labels), key)   # host batch in, sharded here
```

Several hosts: start one process per host with `initialize_distributed(...)` (or the variables
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`) before anything else touches JAX; each
process loads only its rows of every global batch (`local_batch_rows`, `process_local_batches`) and passes
them with `shard_batch(..., local=True)`; `to_host` gathers a sharded state for one process (`is_primary()`)
to write.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from .data._loader import Batch, BatchLoader
from .training._steps import StepConfig, make_eval_step, make_train_step

__all__ = [
    "BATCH_AXES",
    "DATA_AXIS",
    "DEFAULT_MIN_SHARD_SIZE",
    "FSDP_AXIS",
    "MeshError",
    "batch_sharding",
    "check_batch_size",
    "describe_mesh",
    "initialize_distributed",
    "is_primary",
    "local_batch_rows",
    "make_mesh",
    "make_sharded_eval_step",
    "make_sharded_train_step",
    "mesh_from_spec",
    "num_batch_shards",
    "parse_mesh_spec",
    "partition_spec",
    "process_local_batches",
    "replicated",
    "shard_batch",
    "shard_eval_step",
    "shard_state",
    "shard_train_step",
    "state_shardings",
    "to_host",
]

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
# The batch's leading axis is split over both mesh axes: FSDP is data parallelism with sharded parameters.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Arrays smaller than this (in elements) are replicated: splitting them saves little memory and costs a
# collective each. 2**14 float32 = 64 KiB.
DEFAULT_MIN_SHARD_SIZE = 2**14
# Fields whose array leaves carry a leading depth axis (CaiT's SA blocks, stacked and run by `lax.scan`).
# That axis is never split: the scan would need the whole stack on every device at every step.
STACKED_FIELDS = frozenset({"blocks"})

_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"


class MeshError(ValueError):
    """A mesh that cannot be built or used: a bad shape, too few devices, or a batch that does not split."""


# ---------------------------------------------------------------------------------------------------------
# Meshes


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """Parse a mesh shape written as `"data=4,fsdp=2"`.

    **Arguments:**

    - `spec`: comma-separated `axis=size` pairs; the axes are `data` and `fsdp`, each at most once, sizes
        positive integers. A missing axis is left out of the result (see `make_mesh` for its default).

    **Returns:** a dict from axis name to size, e.g. `{"data": 4, "fsdp": 2}`.
    """
    sizes: dict[str, int] = {}
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts:
        raise MeshError(f"Empty mesh specification {spec!r}; write e.g. 'data=4,fsdp=2' or 'data=8'.")
    for part in parts:
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or name not in MESH_AXES:
            raise MeshError(
                f"Bad mesh entry {part!r} in {spec!r}: expected AXIS=SIZE with AXIS one of {MESH_AXES}, "
                f"e.g. 'data=4,fsdp=2'."
            )
        if name in sizes:
            raise MeshError(f"Mesh axis {name!r} is given twice in {spec!r}.")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1 or str(size) != value.lstrip("+"):
            raise MeshError(f"Mesh axis {name!r} needs a positive integer size, got {value!r} in {spec!r}.")
        sizes[name] = size
    return sizes


def _device_hint() -> str:
    return (
        "On CPU, more devices can be simulated by setting XLA_FLAGS=--xla_force_host_platform_device_count=N "
        "(or jax.config.update('jax_num_cpu_devices', N)) before JAX starts."
    )


def make_mesh(data: int | None = None, fsdp: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
    """Build a `(data, fsdp)` device mesh.

    Nothing is compiled or placed: a mesh that needs more devices than exist fails here, with the numbers.

    **Arguments:**

    - `data`: the data-parallel size; `None` uses every device not taken by `fsdp`
        (`len(devices) // fsdp`).
    - `fsdp`: the parameter-sharding size (1: parameters replicated).
    - `devices`: the devices to use, default `jax.devices()` (all processes'). With one process a mesh may
        use the first `data · fsdp` of them; with several it must use all. (Keyword only argument.)

    **Returns:** a `jax.sharding.Mesh` with axes `("data", "fsdp")` (auto-sharded: XLA propagates the
    shardings between the constraints the steps set).
    """
    for name, value in (("data", data), ("fsdp", fsdp)):
        if value is None and name == "data":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MeshError(f"Mesh axis {name!r} must be a positive int, got {value!r}.")
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise MeshError("No devices given to build a mesh on.")
    available = len(devices)
    kind = f"{devices[0].platform} device{'s' if available != 1 else ''}"
    if data is None:
        if available % fsdp:
            raise MeshError(
                f"fsdp={fsdp} does not divide the {available} available {kind}; give data= explicitly or "
                f"an fsdp size that divides {available}."
            )
        data = available // fsdp
    needed = data * fsdp
    if needed > available:
        raise MeshError(
            f"The mesh data={data}, fsdp={fsdp} needs {needed} devices but only {available} {kind} "
            f"{'is' if available == 1 else 'are'} available (over {jax.process_count()} process(es)). Use a "
            f"mesh of at most {available} devices (e.g. --mesh data={available}). {_device_hint()}"
        )
    if jax.process_count() > 1 and needed != available:
        raise MeshError(
            f"With {jax.process_count()} processes the mesh must use every device ({available}), but "
            f"data={data}, fsdp={fsdp} uses {needed}. Leave data= out to fill the devices."
        )
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[:needed])


def mesh_from_spec(spec: str | None, *, devices: Sequence[Any] | None = None) -> Mesh:
    """The mesh of a `--mesh` specification such as `"data=4,fsdp=2"`.

    **Arguments:**

    - `spec`: `"data=D,fsdp=F"` (either may be left out: `fsdp` defaults to 1, `data` to the devices not
        taken by `fsdp`), or `None`: one device with one process, every device with several.
    - `devices`: as in `make_mesh`. (Keyword only argument.)

    **Returns:** the `Mesh`.
    """
    if spec is None:
        return make_mesh(data=1 if jax.process_count() == 1 else None, devices=devices)
    sizes = parse_mesh_spec(spec)
    return make_mesh(data=sizes.get(DATA_AXIS), fsdp=sizes.get(FSDP_AXIS, 1), devices=devices)


def describe_mesh(mesh: Mesh) -> str:
    """A one-line description, e.g. `"data=4 × fsdp=2 (8 cpu devices, 1 process)"`."""
    platform = mesh.devices.flat[0].platform
    processes = len({d.process_index for d in mesh.devices.flat})
    axes = " × ".join(f"{name}={size}" for name, size in mesh.shape.items())
    devices = f"{mesh.size} {platform} device{'s' if mesh.size != 1 else ''}"
    return f"{axes} ({devices}, {processes} process{'es' if processes != 1 else ''})"


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a full copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch: its leading axis split over `data × fsdp`, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def num_batch_shards(mesh: Mesh) -> int:
    """How many slices a batch is cut into (`data · fsdp`)."""
    return math.prod(mesh.shape[name] for name in BATCH_AXES)


def check_batch_size(global_batch: int, mesh: Mesh, *, what: str = "global batch") -> None:
    """Raise `MeshError` unless a batch of `global_batch` examples splits evenly over the mesh.

    **Arguments:**

    - `global_batch`: examples per step over all devices and processes.
    - `mesh`: the mesh.
    - `what`: how to call the batch in the message. (Keyword only argument.)
    """
    shards = num_batch_shards(mesh)
    if global_batch % shards:
        lower = (global_batch // shards) * shards
        upper = lower + shards
        options = f"{lower} or {upper}" if lower > 0 else f"{upper}"
        raise MeshError(
            f"The {what} of {global_batch} does not split evenly over the mesh: it is cut along "
            f"data={mesh.shape[DATA_AXIS]} × fsdp={mesh.shape[FSDP_AXIS]} = {shards} devices, each taking "
            f"an equal slice. Use a batch size that is a multiple of {shards} (e.g. {options}) or another "
            f"mesh."
        )


# ---------------------------------------------------------------------------------------------------------
# Where parameters and optimiser state live


def _is_stacked(path: Sequence[Any]) -> bool:
    return any(isinstance(k, jax.tree_util.GetAttrKey) and k.name in STACKED_FIELDS for k in path)


def partition_spec(
    path: Sequence[Any], shape: Sequence[int], fsdp: int, *, min_size: int = DEFAULT_MIN_SHARD_SIZE
) -> PartitionSpec:
    """The rule that decides how one array of a model or optimiser state is split along `fsdp`.

    An array is replicated when `fsdp == 1`, when it has fewer than `min_size` elements, or when none of its
    axes divides by `fsdp`. Otherwise it is split along its largest axis that `fsdp` divides (the first such
    on ties), never the leading depth axis of the stacked SA blocks (leaves under a `blocks` field). The rule
    sees only the key path and shape, so a parameter and its optimiser moments (same field names, same
    shape) are always split alike.

    **Arguments:**

    - `path`: the leaf's key path (`jax.tree_util.tree_flatten_with_path`).
    - `shape`: the leaf's shape.
    - `fsdp`: the size of the `fsdp` mesh axis.
    - `min_size`: the smallest array (in elements) worth splitting. (Keyword only argument.)

    **Returns:** a `PartitionSpec`, e.g. `PartitionSpec(None, "fsdp", None)` for the stacked `qkv` weights
    `(depth, 3·inner, dim)`.
    """
    if fsdp == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    first = 1 if _is_stacked(path) else 0
    candidates = [axis for axis in range(first, len(shape)) if shape[axis] % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda a: (shape[a], -a))
    return PartitionSpec(*(FSDP_AXIS if a == axis else None for a in range(len(shape))))


def state_shardings(tree: PyTree, mesh: Mesh, *, min_size: int = DEFAULT_MIN_SHARD_SIZE) -> PyTree:
    """The `NamedSharding` of every array leaf of `tree` (a model, optimiser state, ...) by `partition_spec`.

    **Arguments:**

    - `tree`: any PyTree; only its array leaves get a sharding.
    - `mesh`: the mesh.
    - `min_size`: as in `partition_spec`. (Keyword only argument.)

    **Returns:** a PyTree of the structure of `eqx.filter(tree, eqx.is_array)`: a `NamedSharding` at each
    array leaf, `None` elsewhere (the form `eqx.filter_shard` takes).
    """
    fsdp = mesh.shape[FSDP_AXIS]

    def one(path, leaf):
        if not eqx.is_array(leaf):
            return None
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return replicated(mesh)
        return NamedSharding(mesh, partition_spec(path, leaf.shape, fsdp, min_size=min_size))

    return jax.tree_util.tree_map_with_path(one, tree)


def _place(x: Any, sharding: NamedSharding) -> Any:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jr.wrap_key_data(_place(jr.key_data(x), sharding), impl=jr.key_impl(x))
    if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
        # One process: any array can move. Several: a global array reshards; a process-local one is
        # treated as host data below.
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(host, sharding)
    # Every process holds the whole value; each keeps the slices of its own devices.
    return jax.make_array_from_process_local_data(sharding, host, host.shape)


def shard_state(tree: PyTree, mesh: Mesh, *, min_size: int = DEFAULT_MIN_SHARD_SIZE) -> PyTree:
    """Place every array leaf of `tree` on `mesh`, replicated or split along `fsdp` by `partition_spec`.

    Works from host values (NumPy, or a model just built or loaded), from arrays on one device, and from
    arrays sharded over another mesh (a checkpoint saved on 8 devices, resumed on 1). With several processes,
    every process must pass the same values (or the same global arrays).

    **Arguments:**

    - `tree`: a model, an optimiser state, or a tuple of them.
    - `mesh`: the target mesh.
    - `min_size`: as in `partition_spec`. (Keyword only argument.)

    **Returns:** `tree` with its arrays placed; non-array leaves untouched.
    """
    shardings = state_shardings(tree, mesh, min_size=min_size)
    dynamic, static = eqx.partition(tree, eqx.is_array)
    placed = jax.tree.map(_place, dynamic, shardings)
    return eqx.combine(placed, static)


def _on_mesh(tree: PyTree, mesh: Mesh) -> bool:
    """Whether the first array leaf of `tree` already lives on `mesh` (a cheap check, done per step)."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            sharding = leaf.sharding
            return isinstance(sharding, NamedSharding) and sharding.mesh == mesh
        if eqx.is_array(leaf):
            return False
    return True


def to_host(tree: PyTree) -> PyTree:
    """Copy every array leaf of a (possibly sharded, possibly multi-process) `tree` to host NumPy arrays.

    With several processes this is a collective: every process must call it, and every process gets the
    whole value (then one of them, `is_primary()`, writes it). PRNG keys come back as typed keys on the
    host's default device.

    **Arguments:**

    - `tree`: any PyTree.

    **Returns:** `tree` with NumPy arrays in place of its JAX arrays.
    """

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jr.wrap_key_data(jnp.asarray(one(jr.key_data(x))), impl=jr.key_impl(x))
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


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
        global batch, as loaded by `process_local_batches`. (Keyword only argument.)

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


def process_local_batches(
    loader: BatchLoader,
    mesh: Mesh,
    start_epoch: int = 0,
    start_index: int = 0,
    stop_epoch: int | None = None,
) -> Iterator[Batch]:
    """The batches of `loader`, but only this process's rows of each: each process loads its shard only.

    The global order is `loader`'s (its seed and epoch), so all processes together see exactly the batches a
    single process would; pass each with `shard_batch(..., local=True)`.

    **Arguments:**

    - `loader`: the global `BatchLoader` (its `batch_size` is the global batch).
    - `mesh`: the mesh.
    - `start_epoch`, `start_index`, `stop_epoch`: as in `BatchLoader.batches`.

    **Returns:** an iterator of `Batch` holding `local_batch_rows(mesh, loader.batch_size)` of each batch.
    """
    rows = local_batch_rows(mesh, loader.batch_size)
    return loader.batches(start_epoch, start_index, stop_epoch, rows=rows)


# ---------------------------------------------------------------------------------------------------------
# Steps


def shard_train_step(
    step: Callable[..., tuple[Any, Any, dict[str, Any]]],
    mesh: Mesh,
    *,
    min_size: int = DEFAULT_MIN_SHARD_SIZE,
) -> Callable[..., tuple[Any, Any, dict[str, Any]]]:
    """Compile a pure training step `step(model, opt_state, batch, key)` to run on `mesh`.

    The model and optimiser state are constrained to `state_shardings` on the way in and out, the batch to
    `batch_sharding`, the key and the metrics replicated; the whole is one `eqx.filter_jit` with every input
    buffer donated (use only the returned model and state). The returned function accepts a host batch
    (the whole global batch; `shard_batch` cuts it) or an already sharded one, and places a model or state
    that is not yet on `mesh` (`shard_state`) before the first call.

    **Arguments:**

    - `step`: e.g. `make_train_step(optim, config, jit=False)`.
    - `mesh`: the mesh.
    - `min_size`: as in `partition_spec`. (Keyword only argument.)

    **Returns:** `sharded_step(model, opt_state, batch, key) -> (model, opt_state, metrics)`, the metrics
    replicated (readable on every process).
    """
    batch_spec = batch_sharding(mesh)
    everywhere = replicated(mesh)

    def constrained(model, opt_state, batch, key):
        shardings = (state_shardings(model, mesh, min_size=min_size),
                     state_shardings(opt_state, mesh, min_size=min_size))
        model, opt_state = eqx.filter_shard((model, opt_state), shardings)
        batch = eqx.filter_shard(batch, batch_spec)
        key = eqx.filter_shard(key, everywhere)
        model, opt_state, metrics = step(model, opt_state, batch, key)
        model, opt_state = eqx.filter_shard((model, opt_state), shardings)
        return model, opt_state, eqx.filter_shard(metrics, everywhere)

    compiled = eqx.filter_jit(constrained, donate="all")

    def sharded_step(model, opt_state, batch, key):
        if not _on_mesh((model, opt_state), mesh):
            model, opt_state = shard_state((model, opt_state), mesh, min_size=min_size)
        batch = shard_batch(batch, mesh)
        key = _place(key, everywhere) if not _on_mesh(key, mesh) else key
        return compiled(model, opt_state, batch, key)

    return sharded_step


def make_sharded_train_step(
    optim: optax.GradientTransformation,
    config: StepConfig,
    mesh: Mesh,
    *,
    min_size: int = DEFAULT_MIN_SHARD_SIZE,
) -> Callable[..., tuple[Any, Any, dict[str, Any]]]:
    """`make_train_step(optim, config)` compiled for `mesh` (see `shard_train_step`).

    **Arguments:**

    - `optim`: the optimiser.
    - `config`: the `StepConfig`.
    - `mesh`: the mesh.
    - `min_size`: as in `partition_spec`. (Keyword only argument.)

    **Returns:** `step(model, opt_state, (images, labels), key) -> (model, opt_state, metrics)`.
    """
    return shard_train_step(make_train_step(optim, config, jit=False), mesh, min_size=min_size)


def shard_eval_step(
    step: Callable[..., dict[str, Any]], mesh: Mesh, *, min_size: int = DEFAULT_MIN_SHARD_SIZE
) -> Callable[..., dict[str, np.ndarray]]:
    """Compile a pure evaluation step `step(model, (images, labels)) -> dict` to run on `mesh`.

    The batch is split over `data × fsdp` (padded by repeating its first example up to a multiple of
    `num_batch_shards(mesh)`, then cut back), the model kept as `state_shardings` says, and the outputs
    gathered onto every device and returned as NumPy arrays on every process. Nothing is donated.

    **Arguments:**

    - `step`: e.g. `make_eval_step(normalize, jit=False)`.
    - `mesh`: the mesh.
    - `min_size`: as in `partition_spec`. (Keyword only argument.)

    **Returns:** `sharded_eval(model, (images, labels)) -> dict[str, np.ndarray]`, where the batch is the
    whole batch, identical on every process (as `evaluate` passes it).
    """
    batch_spec = batch_sharding(mesh)
    everywhere = replicated(mesh)
    shards = num_batch_shards(mesh)

    def constrained(model, batch):
        model = eqx.filter_shard(model, state_shardings(model, mesh, min_size=min_size))
        batch = eqx.filter_shard(batch, batch_spec)
        return eqx.filter_shard(step(model, batch), everywhere)

    compiled = eqx.filter_jit(constrained)

    def sharded_eval(model, batch):
        if not _on_mesh(model, mesh):
            model = shard_state(model, mesh, min_size=min_size)
        host = jax.tree.map(np.asarray, batch)
        rows = len(jax.tree.leaves(host)[0])
        padded_rows = -(-rows // shards) * shards
        if padded_rows != rows:
            pad = np.zeros(padded_rows - rows, np.int64)
            host = jax.tree.map(lambda x: np.concatenate([x, x[pad]]), host)
        out = compiled(model, shard_batch(host, mesh))
        return {name: np.asarray(value)[:rows] for name, value in out.items()}

    return sharded_eval


def make_sharded_eval_step(
    mesh: Mesh, normalize: str = "none", *, min_size: int = DEFAULT_MIN_SHARD_SIZE
) -> Callable[..., dict[str, np.ndarray]]:
    """`make_eval_step(normalize)` compiled for `mesh` (see `shard_eval_step`), for `evaluate(eval_step=...)`.

    **Arguments:**

    - `mesh`: the mesh.
    - `normalize`: the input normalisation the model was trained with.
    - `min_size`: as in `partition_spec`. (Keyword only argument.)

    **Returns:** `step(model, (images, labels)) -> {"logits", "loss"}` as NumPy arrays.
    """
    return shard_eval_step(make_eval_step(normalize, jit=False), mesh, min_size=min_size)


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
            f"id; missing: {', '.join(missing)}. Pass --coordinator-address HOST:PORT --num-processes N "
            f"--process-id I (or set {_ENV_COORDINATOR}, {_ENV_NUM_PROCESSES}, {_ENV_PROCESS_ID})."
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
