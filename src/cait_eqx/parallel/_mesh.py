"""Where arrays live on a `jax.sharding` mesh: the mesh itself, and the rule that places parameters.

The mesh's two axes, `data` and `fsdp`, are described in `cait_eqx.parallel`'s docstring.

Which parameters are split, and along which axis, is a rule over key paths and shapes (`partition_spec`).
A model tells the rule which of its fields hold stacked layers (a leading depth axis run by `lax.scan`, never
split) with a class attribute `stacked_fields`, as `CaiT.stacked_fields = ("blocks",)`. Batches and several
processes are in `_hosts.py`, the compiled steps in `_compile.py`; `cait_eqx.parallel` is their public face.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from .._model import CaiT

__all__ = [
    "BATCH_AXES",
    "DATA_AXIS",
    "DEFAULT_MIN_SHARD_SIZE",
    "FSDP_AXIS",
    "MeshError",
    "batch_sharding",
    "check_batch_size",
    "describe_mesh",
    "make_mesh",
    "mesh_from_spec",
    "num_batch_shards",
    "on_mesh",
    "parse_mesh_spec",
    "partition_spec",
    "place",
    "replicated",
    "shard_state",
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
            f"mesh of at most {available} devices (e.g. data={available}). {_device_hint()}"
        )
    if jax.process_count() > 1 and needed != available:
        raise MeshError(
            f"With {jax.process_count()} processes the mesh must use every device ({available}), but "
            f"data={data}, fsdp={fsdp} uses {needed}. Leave data= out to fill the devices."
        )
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[:needed])


def mesh_from_spec(spec: str | None, *, devices: Sequence[Any] | None = None) -> Mesh:
    """The mesh of a specification such as `"data=4,fsdp=2"` (what `cait-eqx train --mesh` takes).

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


def _declared_stacked_fields(node: Any) -> tuple[str, ...]:
    fields = getattr(type(node), "stacked_fields", ())
    return fields if isinstance(fields, tuple) else ()


def _stacked_prefixes(tree: PyTree) -> list[tuple[Any, ...]]:
    """The key paths of the fields that the modules in `tree` declare as stacked (`stacked_fields`).

    An optimiser state holds copies of the model's structure (Adam's moments, an EMA), so its stacked
    leaves are found the same way as the model's.
    """
    found: list[tuple[Any, ...]] = []

    def visit(node: Any, prefix: tuple[Any, ...]) -> None:
        found.extend((*prefix, jax.tree_util.GetAttrKey(name)) for name in _declared_stacked_fields(node))

        def declares(x: Any) -> bool:
            return x is not node and bool(_declared_stacked_fields(x))

        for path, child in jax.tree_util.tree_flatten_with_path(node, is_leaf=declares)[0]:
            if declares(child):
                visit(child, (*prefix, *path))

    visit(tree, ())
    return found


def partition_spec(
    path: Sequence[Any],
    shape: Sequence[int],
    fsdp: int,
    *,
    min_size: int = DEFAULT_MIN_SHARD_SIZE,
    stacked: bool | None = None,
) -> PartitionSpec:
    """The rule that decides how one array of a model or optimiser state is split along `fsdp`.

    An array is replicated when `fsdp == 1`, when it has fewer than `min_size` elements, or when none of its
    axes divides by `fsdp`. Otherwise it is split along its largest axis that `fsdp` divides (the first such
    on ties), never the leading depth axis of stacked layers. The rule sees only the key path and shape, so
    a parameter and its optimiser moments (same field names, same shape) are always split alike.

    **Arguments:**

    - `path`: the leaf's key path (`jax.tree_util.tree_flatten_with_path`).
    - `shape`: the leaf's shape.
    - `fsdp`: the size of the `fsdp` mesh axis.
    - `min_size`: the smallest array (in elements) worth splitting. (Keyword only argument.)
    - `stacked`: whether the leaf's leading axis stacks layers (then it is never split). `None`: whether
        `path` passes through a field that `CaiT.stacked_fields` names (`state_shardings` passes it for
        every leaf, from the `stacked_fields` of the modules in the tree). (Keyword only argument.)

    **Returns:** a `PartitionSpec`, e.g. `PartitionSpec(None, "fsdp", None)` for the stacked `qkv` weights
    `(depth, 3·inner, dim)`.
    """
    if fsdp == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    if stacked is None:
        stacked = any(
            isinstance(k, jax.tree_util.GetAttrKey) and k.name in CaiT.stacked_fields for k in path
        )
    first = 1 if stacked else 0
    candidates = [axis for axis in range(first, len(shape)) if shape[axis] % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda a: (shape[a], -a))
    return PartitionSpec(*(FSDP_AXIS if a == axis else None for a in range(len(shape))))


def state_shardings(tree: PyTree, mesh: Mesh, *, min_size: int = DEFAULT_MIN_SHARD_SIZE) -> PyTree:
    """The `NamedSharding` of every array leaf of `tree` (a model, optimiser state, ...) by `partition_spec`.

    Leaves under a field that a module of `tree` names in its `stacked_fields` class attribute (as
    `CaiT.stacked_fields = ("blocks",)`) keep their leading axis whole.

    **Arguments:**

    - `tree`: any PyTree; only its array leaves get a sharding.
    - `mesh`: the mesh.
    - `min_size`: as in `partition_spec`. (Keyword only argument.)

    **Returns:** a PyTree of the structure of `eqx.filter(tree, eqx.is_array)`: a `NamedSharding` at each
    array leaf, `None` elsewhere (the form `eqx.filter_shard` takes).
    """
    fsdp = mesh.shape[FSDP_AXIS]
    prefixes = _stacked_prefixes(tree)

    def one(path, leaf):
        if not eqx.is_array(leaf):
            return None
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return replicated(mesh)
        stacked = any(tuple(path[: len(prefix)]) == prefix for prefix in prefixes)
        return NamedSharding(mesh, partition_spec(path, leaf.shape, fsdp, min_size=min_size, stacked=stacked))

    return jax.tree_util.tree_map_with_path(one, tree)


def place(x: Any, sharding: NamedSharding) -> Any:
    """Put one array (host, one device, another mesh; a PRNG key too) on `sharding`."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jr.wrap_key_data(place(jr.key_data(x), sharding), impl=jr.key_impl(x))
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
    placed = jax.tree.map(place, dynamic, shardings)
    return eqx.combine(placed, static)


def on_mesh(tree: PyTree, mesh: Mesh) -> bool:
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
