"""The training and evaluation steps compiled for a mesh: `cait_eqx.training`'s steps, under its shardings.

There is no hand-written communication: a step is the ordinary pure step, compiled once with
`eqx.filter_jit` under sharding constraints (`eqx.filter_shard`), and XLA inserts the all-gathers and
reduce-scatters. One device is the same code with a mesh of one device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax
from jax.sharding import Mesh
from jaxtyping import PyTree

from ..training._config import StepConfig
from ..training._jit import owned_filter_jit
from ..training._steps import jit_train_step, make_eval_step, make_train_step
from ._hosts import shard_batch
from ._mesh import (
    DEFAULT_MIN_SHARD_SIZE,
    batch_sharding,
    num_batch_shards,
    on_mesh,
    place,
    replicated,
    shard_state,
    state_shardings,
)

__all__ = [
    "make_sharded_eval_step",
    "make_sharded_train_step",
    "replicate",
    "shard_eval_step",
    "shard_train_step",
]


def shard_train_step(
    step: Callable[..., tuple[Any, Any, dict[str, Any]]],
    mesh: Mesh,
    *,
    min_size: int = DEFAULT_MIN_SHARD_SIZE,
) -> Callable[..., tuple[Any, Any, dict[str, Any]]]:
    """Compile a pure training step `step(model, opt_state, batch, key[, teacher])` to run on `mesh`.

    The model and optimiser state are constrained to `state_shardings` on the way in and out, the batch to
    `batch_sharding`, the key, a distillation teacher and the metrics replicated; the whole is one compiled
    function (`jit_train_step`: freed with the returned step) with every input buffer but the teacher's
    donated (use only the returned model and state). The returned function accepts a host batch (the whole
    global batch; `shard_batch` cuts it) or an already sharded one, and places a model or state that is not
    yet on `mesh` (`shard_state`), or a teacher (`replicate`), before the first call: place the teacher once
    yourself to avoid a copy per step.

    **Arguments:**

    - `step`: e.g. `make_train_step(optim, config, jit=False)`.
    - `mesh`: the mesh.
    - `min_size`: as in `partition_spec`. (Keyword only argument.)

    **Returns:** `sharded_step(model, opt_state, batch, key, teacher=None) -> (model, opt_state, metrics)`,
    the metrics replicated (readable on every process); `step` gets the teacher only when one is given.
    """
    batch_spec = batch_sharding(mesh)
    everywhere = replicated(mesh)

    def constrained(model, opt_state, batch, key, teacher=None):
        shardings = (state_shardings(model, mesh, min_size=min_size),
                     state_shardings(opt_state, mesh, min_size=min_size))
        model, opt_state = eqx.filter_shard((model, opt_state), shardings)
        batch = eqx.filter_shard(batch, batch_spec)
        key = eqx.filter_shard(key, everywhere)
        if teacher is None:
            model, opt_state, metrics = step(model, opt_state, batch, key)
        else:
            teacher = eqx.filter_shard(teacher, everywhere)
            model, opt_state, metrics = step(model, opt_state, batch, key, teacher)
        model, opt_state = eqx.filter_shard((model, opt_state), shardings)
        return model, opt_state, eqx.filter_shard(metrics, everywhere)

    compiled = jit_train_step(constrained)

    def sharded_step(model, opt_state, batch, key, teacher=None):
        if not on_mesh((model, opt_state), mesh):
            model, opt_state = shard_state((model, opt_state), mesh, min_size=min_size)
        batch = shard_batch(batch, mesh)
        key = place(key, everywhere) if not on_mesh(key, mesh) else key
        if teacher is not None and not on_mesh(teacher, mesh):
            teacher = replicate(teacher, mesh)
        return compiled(model, opt_state, batch, key, teacher)

    return sharded_step


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place a full copy of every array leaf of `tree` on every device of `mesh`, e.g. a distillation
    teacher, which every device runs on its own slice of the batch (`shard_state` would split large arrays).

    **Arguments:**

    - `tree`: a PyTree (a model); its leaves that are not arrays are kept as they are.
    - `mesh`: the mesh.

    **Returns:** `tree` with every array leaf replicated over `mesh` (`replicated(mesh)`).
    """
    everywhere = replicated(mesh)
    return jax.tree.map(lambda x: place(x, everywhere) if eqx.is_array(x) else x, tree)


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

    compiled = owned_filter_jit(constrained)  # its programs go with `sharded_eval`

    def sharded_eval(model, batch):
        if not on_mesh(model, mesh):
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
