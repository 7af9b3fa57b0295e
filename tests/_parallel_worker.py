"""One process of a multi-process training run over loopback, for tests/test_parallel.py.

Run as `python tests/_parallel_worker.py --coordinator-address 127.0.0.1:PORT --num-processes 2 --process-id I
--out DIR` (or without the first three, in an environment that says them, such as SLURM's `srun`). Every
process joins the run with `cait_eqx.parallel.initialize_distributed`, sees its own `--local-devices` CPU
devices, loads only its rows of each global batch, and trains the tiny model of `setup()` for `--steps` steps
on a mesh over all processes' devices; process 0 alone writes `DIR/result.npz` (the losses, the gathered final
parameters, eval logits, and how the parameters were sharded). With `--fit-dir`, the processes then run `fit`
on the mesh for `FIT_STEPS` steps into that run directory (shared by both; process 0 alone writes the metrics
and the checkpoint). The test runs the same `setup()` in one process and compares.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

GLOBAL_BATCH = 16
NUM_EVAL = 14  # not a multiple of the 4 batch shards: the eval step must pad and cut back
MIN_SHARD_SIZE = 1024  # small enough that the tiny model has sharded and replicated leaves
FIT_STEPS = 2
FIT_DIM = 64  # `fit` shards by the default rule (arrays of 2**14 elements and more): the MLP and qkv weights


def setup(dim: int = 32):
    """The model (width `dim`), optimiser, step config, data and run key shared by the worker and the test."""
    import jax.random as jr

    import cait_eqx
    from cait_eqx.data import load_digits
    from cait_eqx.training import StepConfig, make_optimizer

    data = load_digits(image_size=16)
    model = cait_eqx.CaiT(
        image_size=16, patch_size=4, num_classes=10, dim=dim, depth=2, cls_depth=1, heads=4, mlp_dim=2 * dim,
        channels=1, dropout=0.1, layer_dropout=0.1, key=jr.key(1),
    )
    optim = make_optimizer(1e-3, weight_decay=0.05, clip_norm=1.0)
    config = StepConfig(num_classes=10, label_smoothing=0.1, mixup_alpha=0.8, crop_padding=1)
    return model, optim, config, data, jr.key(2)


def fit_config():
    """The `TrainConfig` of the `fit` runs: one epoch of global batches of 16, a checkpoint every 2 steps."""
    from cait_eqx.training import TrainConfig

    return TrainConfig(
        epochs=1, batch_size=GLOBAL_BATCH, lr=1e-3, warmup_epochs=0.0, clip_norm=1.0, label_smoothing=0.1,
        mixup_alpha=0.8, crop_padding=1, log_every=1, checkpoint_every=FIT_STEPS, seed=0,
    )


def flat_params(model) -> dict:
    """`{"blocks.attn.qkv.weight": array, ...}` for every array leaf of `model`."""
    import equinox as eqx
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_array))[0]
    return {jax.tree_util.keystr(path, simple=True, separator="."): leaf for path, leaf in leaves}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    # Without these three, the run's settings come from the environment (e.g. SLURM's variables).
    parser.add_argument("--coordinator-address")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--local-devices", type=int, default=2)
    parser.add_argument("--mesh", default="data=2,fsdp=2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fit-dir", type=Path, help="then run `fit` into this run directory")
    parser.add_argument("--reads", type=Path, help="then write the examples the data pipeline read here")
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_num_cpu_devices", args.local_devices)
    jax.config.update("jax_numpy_rank_promotion", "raise")

    from cait_eqx import parallel

    joined = parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                             timeout_s=60)
    assert joined and jax.process_count() == (args.num_processes or 2), (joined, jax.process_count())

    import jax.random as jr
    import numpy as np

    from cait_eqx.data import TrainPipeline

    model, optim, config, data, key = setup()
    mesh = parallel.mesh_from_spec(args.mesh)
    import equinox as eqx

    opt_state = optim.init(eqx.filter(model, eqx.is_array))
    model, opt_state = parallel.shard_state((model, opt_state), mesh, min_size=MIN_SHARD_SIZE)
    step = parallel.make_sharded_train_step(optim, config, mesh, min_size=MIN_SHARD_SIZE)
    rows = parallel.local_batch_rows(mesh, GLOBAL_BATCH)
    # This process's rows of every global batch, as `fit` loads them.
    pipeline = TrainPipeline(data, GLOBAL_BATCH, seed=0, rows=rows, workers=0)
    losses, local_rows = [], []
    with contextlib.closing(pipeline.batches(0, 0, stop_epoch=1)) as batches:
        for i, batch in zip(range(args.steps), batches, strict=False):
            local_rows.append(len(batch.images))
            sharded = parallel.shard_batch((batch.images, batch.labels), mesh, local=True)
            model, opt_state, metrics = step(model, opt_state, sharded, jr.fold_in(key, i))
            losses.append(float(metrics["loss"]))

    qkv = model.blocks.attn.qkv.weight
    eval_step = parallel.make_sharded_eval_step(mesh, min_size=MIN_SHARD_SIZE)
    logits = eval_step(model, (data.images[:NUM_EVAL], data.labels[:NUM_EVAL].astype(np.int32)))["logits"]
    params = parallel.to_host(flat_params(model))  # a collective: every process takes part
    if parallel.is_primary():
        args.out.mkdir(parents=True, exist_ok=True)
        np.savez(
            args.out / "result.npz",
            losses=np.asarray(losses),
            logits=logits,
            local_rows=np.asarray(local_rows),
            rows=np.asarray([rows.start, rows.stop]),
            qkv_spec=np.asarray(repr(qkv.sharding.spec)),
            qkv_local_shape=np.asarray(qkv.addressable_shards[0].data.shape),
            num_devices=np.asarray(jax.device_count()),
            **{f"param:{name}": value for name, value in params.items()},
        )
    else:
        (args.out / f"rows-{jax.process_index()}.txt").write_text(f"{rows.start} {rows.stop}\n")

    if args.fit_dir is not None:
        from cait_eqx.training import fit

        model, _, _, data, key = setup(FIT_DIM)
        result = fit(model, data, None, fit_config(), key=key, run_dir=args.fit_dir, mesh=mesh,
                     max_steps=FIT_STEPS, progress=False, handle_signals=False)
        assert result.status == "max_steps" and result.step == FIT_STEPS, (result.status, result.step)
        qkv = result.model.blocks.attn.qkv.weight
        local = {s.data.shape for s in qkv.addressable_shards}
        assert local == {(2, 3 * FIT_DIM // 2, FIT_DIM)}, qkv.sharding  # (depth, 3·dim, dim): 3·dim split
        assert (result.checkpoint is not None) == parallel.is_primary()
    if args.reads is not None:
        _record_reads(args.reads, mesh)
    jax.distributed.shutdown()
    return 0


# 8 batches an epoch, and 5 examples left over (dropped: different ones each epoch).
READ_EXAMPLES = 8 * GLOBAL_BATCH + 5
READ_EPOCHS = 2


def id_dataset():
    """`READ_EXAMPLES` examples whose pixels spell their index (two bytes), for counting what was read."""
    import numpy as np

    from cait_eqx.data import Dataset

    ids = np.arange(READ_EXAMPLES)
    images = np.stack([ids % 256, ids // 256], axis=-1).astype(np.uint8).reshape(-1, 1, 1, 2)
    return Dataset(images, np.zeros(READ_EXAMPLES, np.int32), ("x",), "ids")


def _record_reads(path: Path, mesh) -> None:
    """Run the training data pipeline as `fit` does on this process (its rows, one data worker) for
    `READ_EPOCHS` epochs and write `path/reads-<process>.npz`: the epoch, batch and example of every read."""
    import jax
    import numpy as np

    from cait_eqx import parallel
    from cait_eqx.data import TrainPipeline

    pipeline = TrainPipeline(id_dataset(), GLOBAL_BATCH, seed=0, workers=1,
                             rows=parallel.local_batch_rows(mesh, GLOBAL_BATCH))
    epochs, batches, examples = [], [], []
    for batch in pipeline.batches(0, 0, READ_EPOCHS):
        ids = batch.images[:, 0, 0, 0].astype(np.int64) + 256 * batch.images[:, 0, 0, 1].astype(np.int64)
        epochs += [batch.epoch] * len(ids)
        batches += [batch.index] * len(ids)
        examples += ids.tolist()
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / f"reads-{jax.process_index()}.npz", epoch=epochs, batch=batches, example=examples)


if __name__ == "__main__":
    sys.exit(main())
