"""Data-parallel and parameter-sharded training on a `jax.sharding` mesh, from one device to many hosts.

One mesh with two named axes carries everything:

- `data`: data parallelism. Every device along it holds the parameters its `fsdp` group holds and works
    on its own slice of the batch.
- `fsdp`: fully-sharded data parallelism. Large parameter arrays (and the optimiser state that mirrors
    them) are split along this axis, so each device stores only `1/fsdp` of them; the batch is split over
    this axis too, so the devices of an `fsdp` group still work on different examples.

The batch is split along its leading axis over `data × fsdp` (every device gets `batch / (data · fsdp)`
examples). Which parameters are split, and along which axis, is a rule over names and shapes
(`partition_spec`); a model names the fields that hold stacked layers, whose leading depth axis is never
split, in a class attribute (`CaiT.stacked_fields = ("blocks",)`). There is no hand-written communication:
the step is the ordinary pure training step, compiled once with `eqx.filter_jit` under sharding constraints
(`eqx.filter_shard`), and XLA inserts the all-gathers and reduce-scatters. One device is the same code with
a mesh of one device.

```python
import cait_eqx, jax
from cait_eqx import parallel

mesh = parallel.make_mesh(data=4, fsdp=2)                # or parallel.mesh_from_spec("data=4,fsdp=2")
model, opt_state = parallel.shard_state((model, opt_state), mesh)
step = parallel.make_sharded_train_step(optim, step_config, mesh)
model, opt_state, metrics = step(model, opt_state, (images, labels), key)   # host batch in, sharded here
```

Several hosts: start one process per host with `initialize_distributed(...)` (or the variables
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; under SLURM's `srun`, Open MPI's `mpirun`,
Kubernetes or a TPU pod, nothing: `detect_cluster` reads the scheduler's settings as JAX does) before
anything else touches JAX; each
process loads only its rows of every global batch (`local_batch_rows`, the `rows` of
`cait_eqx.data.TrainPipeline`) and passes them with `shard_batch(..., local=True)`; `to_host` gathers a
sharded state for one process (`is_primary()`) to write.

The room: `_mesh.py` (the mesh, and where arrays live on it: the placement rule, `shard_state`, `to_host`),
`_hosts.py` (what each process loads and places: its rows of a global batch, `shard_batch`; joining a run of
several processes) and `_compile.py` (the training and evaluation steps compiled for a mesh). It shares a
layer with `cait_eqx.training`: `fit` trains on a mesh, and the steps compiled here are training's steps.
The names are imported on first use (`cait_eqx._lazy`): `import cait_eqx.parallel` does not import JAX.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._compile import (
        make_sharded_eval_step as make_sharded_eval_step,
        make_sharded_train_step as make_sharded_train_step,
        replicate as replicate,
        shard_eval_step as shard_eval_step,
        shard_train_step as shard_train_step,
    )
    from ._hosts import (
        ClusterSettings as ClusterSettings,
        detect_cluster as detect_cluster,
        initialize_distributed as initialize_distributed,
        is_primary as is_primary,
        local_batch_rows as local_batch_rows,
        shard_batch as shard_batch,
    )
    from ._mesh import (
        BATCH_AXES as BATCH_AXES,
        DATA_AXIS as DATA_AXIS,
        DEFAULT_MIN_SHARD_SIZE as DEFAULT_MIN_SHARD_SIZE,
        FSDP_AXIS as FSDP_AXIS,
        MeshError as MeshError,
        batch_sharding as batch_sharding,
        check_batch_size as check_batch_size,
        describe_mesh as describe_mesh,
        make_mesh as make_mesh,
        mesh_from_spec as mesh_from_spec,
        num_batch_shards as num_batch_shards,
        parse_mesh_spec as parse_mesh_spec,
        partition_spec as partition_spec,
        replicated as replicated,
        shard_state as shard_state,
        state_shardings as state_shardings,
        to_host as to_host,
    )
else:
    from .._lazy import attach as _attach

    __getattr__, __dir__, __all__ = _attach(__name__, __file__)
