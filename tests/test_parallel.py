"""Data-parallel and parameter-sharded training on a mesh of the 8 simulated CPU devices (tests/conftest.py).

What would be wrong, and which test sees it:
- a mesh that changes the maths (a gradient averaged over one shard only, a batch cut wrongly, keys that
  depend on the sharding): `test_meshes_train_alike` compares 3 steps on data=8 and data=4,fsdp=2 with one
  device;
- parameters that are not really sharded, or sharded along the scanned depth axis: the same test reads
  `.sharding` and the per-device shard shapes, and `test_partition_rule` checks the rule itself;
- a multi-process run that loads the wrong rows or writes from every process: `test_two_processes_match_one`
  and, through `fit`, `test_fit_resumes_a_two_process_run_on_one_device`;
- a checkpoint that only restores onto the mesh it was saved from: `test_checkpoint_moves_between_meshes`
  (8 devices → 1 and 4) and the `fit` test (2 processes × 2 devices → 1);
- a bad mesh or batch found only by the compiler, or not at all: `test_errors_come_before_compilation`,
  `test_fit_checks_the_batch_before_compiling`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from _parallel_worker import (
    FIT_DIM,
    FIT_STEPS,
    GLOBAL_BATCH,
    MIN_SHARD_SIZE,
    NUM_EVAL,
    fit_config,
    flat_params,
    setup,
)
from jax.sharding import NamedSharding, PartitionSpec as P

import cait_eqx
from cait_eqx import cli, parallel
from cait_eqx.data import TrainPipeline
from cait_eqx.training import fit, list_checkpoints, load_checkpoint, save_checkpoint

WORKER = Path(__file__).with_name("_parallel_worker.py")
STEPS = 3
# Float32 sums in another order differ by a few ulps. Where a gradient's terms nearly cancel, those ulps are a
# relative error of up to ~1e-3 in the gradient, and AdamW (which divides each gradient by its own scale)
# passes it on to that parameter's step: 2.6e-6 after 4 steps of lr 1e-3 was seen (1 parameter in 8,192).
# A wrong reduction (one shard's gradient, a doubled batch) changes the gradients themselves, and AdamW's
# first steps are ~lr = 1e-3 per parameter whatever the gradient's size: many parameters then move by ~1e-3.
PARAM_ATOL = 1e-5
LOSS_TOL = 2e-6

_COMPILED: dict[str, tuple] = {}


def _compiled(spec: str):
    """(mesh, train step, eval step) for a mesh spec, compiled once per test session and shared by tests."""
    if spec not in _COMPILED:
        _, optim, config, _, _ = setup()
        mesh = parallel.mesh_from_spec(spec)
        _COMPILED[spec] = (
            mesh,
            parallel.make_sharded_train_step(optim, config, mesh, min_size=MIN_SHARD_SIZE),
            parallel.make_sharded_eval_step(mesh, min_size=MIN_SHARD_SIZE),
        )
    return _COMPILED[spec]


def _train(spec: str, steps: int, *, start: int = 0, state=None):
    """Train the `setup()` model for `steps` steps from batch `start` on the mesh `spec`.

    `state` is `(model, opt_state)` to continue from (default: the fresh model). Returns the model, the
    optimiser state and the per-step losses.
    """
    model, optim, _, data, key = setup()
    mesh, step, _ = _compiled(spec)
    if state is None:
        state = (model, optim.init(eqx.filter(model, eqx.is_array)))
    model, opt_state = parallel.shard_state(state, mesh, min_size=MIN_SHARD_SIZE)
    # The batches `fit` reads (in this process), from batch number `start`.
    pipeline = TrainPipeline(data, GLOBAL_BATCH, seed=0, workers=0)
    losses = []
    with contextlib.closing(pipeline.batches(*divmod(start, pipeline.steps_per_epoch))) as batches:
        for i, batch in zip(range(start, start + steps), batches, strict=False):
            images_labels = (batch.images, batch.labels)
            model, opt_state, metrics = step(model, opt_state, images_labels, jr.fold_in(key, i))
            losses.append(float(metrics["loss"]))
    return model, opt_state, np.asarray(losses)


def _host_params(model) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in flat_params(model).items()}


def _eval_logits(spec: str, model) -> np.ndarray:
    _, _, _, data, _ = setup()
    _, _, eval_step = _compiled(spec)
    return eval_step(model, (data.images[:NUM_EVAL], data.labels[:NUM_EVAL].astype(np.int32)))["logits"]


def _assert_same_params(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=PARAM_ATOL, err_msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def reference():
    """3 steps on one device: the losses, parameters and eval logits every mesh must reproduce."""
    model, _, losses = _train("data=1", STEPS)
    return losses, _host_params(model), _eval_logits("data=1", model)


def test_partition_rule():
    key = jax.tree_util.GetAttrKey
    stacked_qkv = (key("blocks"), key("attn"), key("qkv"), key("weight"))
    ca_fc2 = (key("blocks_token_only"), jax.tree_util.SequenceKey(0), key("mlp"), key("fc2"), key("weight"))
    # The largest axis that fsdp divides; never the stacked depth axis, even when it is the largest.
    assert parallel.partition_spec(stacked_qkv, (12, 1152, 384), 2) == P(None, "fsdp", None)
    assert parallel.partition_spec(stacked_qkv, (64, 48, 512), 4) == P(None, None, "fsdp")
    assert parallel.partition_spec(stacked_qkv, (8, 6, 2999), 4) == P()  # no non-depth axis divides
    assert parallel.partition_spec(ca_fc2, (384, 1536), 4) == P(None, "fsdp")
    assert parallel.partition_spec(ca_fc2, (1536, 1536), 4) == P("fsdp", None)  # ties: the first axis
    assert parallel.partition_spec(ca_fc2, (384, 1536), 5) == P()  # nothing divides by 5
    # Small arrays stay whole; fsdp=1 never splits.
    assert parallel.partition_spec((key("norm"), key("weight")), (384,), 2) == P()
    assert parallel.partition_spec(ca_fc2, (64, 32), 2, min_size=4096) == P()
    assert parallel.partition_spec(ca_fc2, (64, 32), 2, min_size=2048) == P("fsdp", None)
    assert parallel.partition_spec(ca_fc2, (384, 1536), 1) == P()


def test_the_model_tells_the_rule_its_stacked_fields():
    """A module's `stacked_fields` keeps the leading axis of those fields whole; nothing else does."""

    class Stack(eqx.Module):
        stacked_fields: ClassVar[tuple[str, ...]] = ("layers",)
        layers: jax.Array
        head: jax.Array

    class Plain(eqx.Module):
        layers: jax.Array

    assert cait_eqx.CaiT.stacked_fields == ("blocks",)
    mesh = parallel.mesh_from_spec("data=2,fsdp=4")
    stack = {"model": Stack(jnp.zeros((8, 6, 2999)), jnp.zeros((8, 6, 2999)))}
    shardings = parallel.state_shardings(stack, mesh, min_size=1)
    assert shardings["model"].layers.spec == P()  # its depth axis stays whole and nothing else divides by 4
    assert shardings["model"].head.spec == P("fsdp", None, None)  # not stacked: the same shape splits
    assert parallel.state_shardings(Plain(jnp.zeros((8, 6, 2999))), mesh, min_size=1).layers.spec == P(
        "fsdp", None, None
    )  # the same field name, undeclared: split
    # Adam's moments mirror the model, so they are stacked alike.
    moments = parallel.state_shardings(optax.adam(1e-3).init(stack), mesh, min_size=1)[0]
    assert moments.mu["model"].layers.spec == P() and moments.mu["model"].head.spec == P("fsdp", None, None)


def test_sharding_errors_name_no_command_line_flags(monkeypatch):
    """The CLI adds its flags to these messages; the library's own words name arguments and variables."""
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    errors = []
    for call in (lambda: parallel.make_mesh(data=16), lambda: parallel.initialize_distributed(None, 2, None),
                 lambda: parallel.check_batch_size(12, parallel.make_mesh(data=8))):
        with pytest.raises(ValueError) as error:
            call()
        errors.append(str(error.value))
    for message in errors:
        assert not re.search(r"(?<![\w=])--(?!xla)[a-z]", message), message
    assert "`coordinator_address`" in errors[1]


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["data=8", "data=4,fsdp=2"])
def test_meshes_train_alike(spec, reference):
    want_losses, want_params, want_logits = reference
    model, opt_state, losses = _train(spec, STEPS)
    np.testing.assert_allclose(losses, want_losses, rtol=LOSS_TOL, atol=LOSS_TOL)
    _assert_same_params(_host_params(model), want_params, spec)
    np.testing.assert_allclose(_eval_logits(spec, model), want_logits, rtol=0, atol=1e-5)

    mesh = _compiled(spec)[0]
    fsdp = mesh.shape["fsdp"]
    params = flat_params(model)
    moments = opt_state[1].mu  # AdamW's first moment mirrors the model
    # name: (full shape, the axis fsdp splits or None). Stacked SA weights (depth, out, in) split along their
    # largest non-depth axis; small leaves stay whole on every device.
    layout = {
        "blocks.attn.qkv.weight": ((2, 96, 32), 1),
        "blocks.mlp.fc2.weight": ((2, 32, 64), 2),
        "blocks_token_only.0.attn.q.weight": ((32, 32), 0),
        "blocks.norm1.weight": ((2, 32), None),
        "head.weight": ((10, 32), None),
        "pos_embed": ((16, 32), None),
    }
    for name, (shape, axis) in layout.items():
        leaf = params[name]
        split = axis is not None and fsdp > 1
        want_spec = P(*("fsdp" if split and a == axis else None for a in range(len(shape))))
        local_shape = tuple(n // fsdp if split and a == axis else n for a, n in enumerate(shape))
        want = NamedSharding(mesh, want_spec)
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (name, leaf.sharding)
        assert len(leaf.sharding.device_set) == 8, name
        assert {s.data.shape for s in leaf.addressable_shards} == {local_shape}, name
    assert moments.blocks.attn.qkv.weight.sharding == params["blocks.attn.qkv.weight"].sharding
    # The batch: 16 examples over data × fsdp = 8 devices, 2 rows each.
    images = parallel.shard_batch(np.zeros((GLOBAL_BATCH, 1, 16, 16), np.uint8), mesh)
    assert {s.data.shape[0] for s in images.addressable_shards} == {GLOBAL_BATCH // 8}
    assert images.sharding.spec == P(("data", "fsdp")) and len(images.sharding.device_set) == 8


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _free_port_in(low: int, high: int) -> int:
    """A port in [low, high] that nothing listens on now (tried from a random start)."""
    start = int(np.random.default_rng().integers(low, high + 1))
    for port in [*range(start, high + 1), *range(low, start)]:
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"No free port in [{low}, {high}].")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Two OS processes over loopback, 2 CPU devices each, mesh data=2,fsdp=2: steps, then `fit`.

    Returns the directory with process 0's `result.npz` (and process 1's note) and the `fit` run directory.
    """
    out = tmp_path_factory.mktemp("two_processes")
    run_dir = tmp_path_factory.mktemp("two_process_fit")
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "--coordinator-address", address, "--num-processes", "2",
             "--process-id", str(rank), "--local-devices", "2", "--mesh", "data=2,fsdp=2",
             "--steps", str(STEPS), "--out", str(out), "--fit-dir", str(run_dir),
             "--reads", str(out / "reads")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {rank} failed:\n{output[-4000:]}"
    return out, run_dir


@pytest.mark.slow
def test_two_processes_match_one(reference, two_processes):
    want_losses, want_params, want_logits = reference
    tmp_path, _ = two_processes
    # Process 0 alone wrote the result; process 1 only its note.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reads", "result.npz", "rows-1.txt"]
    result = np.load(tmp_path / "result.npz")
    assert int(result["num_devices"]) == 4
    # Each process loaded only its half of every global batch of 16: rows 0-8 and 8-16.
    assert result["rows"].tolist() == [0, 8] and result["local_rows"].tolist() == [8] * STEPS
    assert (tmp_path / "rows-1.txt").read_text().split() == ["8", "16"]
    # The qkv weights were split over the processes' 2 fsdp devices.
    assert "fsdp" in str(result["qkv_spec"]) and result["qkv_local_shape"].tolist() == [2, 48, 32]
    np.testing.assert_allclose(result["losses"], want_losses, rtol=LOSS_TOL, atol=LOSS_TOL)
    got = {name[len("param:"):]: result[name] for name in result.files if name.startswith("param:")}
    _assert_same_params(got, want_params, "two processes")
    np.testing.assert_allclose(result["logits"], want_logits, rtol=0, atol=1e-5)


def _slurm_environment(rank: int, job_id: int) -> dict[str, str]:
    """What SLURM's `srun -n 2` on one node gives task `rank` (the variables JAX's `SlurmCluster` reads, and
    a few more), without any of JAX's or cait_eqx's own settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                                                   "JAX_PROCESS_ID", "SLURM_"))}
    return {
        **env, "SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "2", "SLURM_NPROCS": "2", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
        "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_STEP_NUM_NODES": "1", "SLURM_NODELIST": "localhost",
        "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2",
    }


@pytest.mark.slow
def test_two_processes_started_by_slurm_join_with_no_settings(reference, tmp_path):
    """`srun -n 2 ...`: each process gets only SLURM's variables, and `initialize_distributed()` with nothing
    given must join them as JAX's own detection reads SLURM (process 0's host, a port from the job id), and
    train as one process does. Wrong would be two separate one-process runs (each its own result, or a
    mesh of 2 devices), or a run that waits for a coordinator nobody started."""
    # JAX's port for a SLURM job: 61440 + job id mod 4096. A job id whose port is free now.
    job_id = 4096 * 7 + _free_port_in(61440, 65535) - 61440
    assert parallel.detect_cluster() is None  # this test process itself: no scheduler, one process
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "--local-devices", "2", "--mesh", "data=2,fsdp=2", "--steps",
             str(STEPS), "--out", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_slurm_environment(rank, job_id),
        )
        for rank in range(2)
    ]
    try:
        outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {rank} failed:\n{output[-4000:]}"
    want_losses, want_params, _ = reference
    result = np.load(tmp_path / "result.npz")
    assert int(result["num_devices"]) == 4  # both processes' devices in one mesh
    assert result["rows"].tolist() == [0, 8] and (tmp_path / "rows-1.txt").read_text().split() == ["8", "16"]
    np.testing.assert_allclose(result["losses"], want_losses, rtol=LOSS_TOL, atol=LOSS_TOL)
    got = {name[len("param:"):]: result[name] for name in result.files if name.startswith("param:")}
    _assert_same_params(got, want_params, "two SLURM tasks")


@pytest.mark.slow
def test_two_processes_read_every_example_once_per_epoch(two_processes):
    """Each process's data pipeline reads only its rows of every global batch: together, every example of
    an epoch's order exactly once (the 5 left over are dropped), nothing twice, nothing of the other's."""
    from _parallel_worker import READ_EPOCHS, READ_EXAMPLES

    from cait_eqx.data import Sampler

    out, _ = two_processes
    reads = [np.load(out / "reads" / f"reads-{rank}.npz") for rank in range(2)]
    sampler = Sampler(READ_EXAMPLES, GLOBAL_BATCH, seed=0)
    kept = sampler.steps_per_epoch * GLOBAL_BATCH
    for epoch in range(READ_EPOCHS):
        order = sampler.order(epoch)[:kept].reshape(sampler.steps_per_epoch, GLOBAL_BATCH)
        got = [r["example"][r["epoch"] == epoch] for r in reads]
        both = np.concatenate(got)
        assert len(both) == kept and len(np.unique(both)) == kept, epoch  # each once, none twice
        assert set(both.tolist()) == set(order.ravel().tolist())
        # Process 0 read rows 0-8 of every batch, process 1 rows 8-16: what their devices hold.
        np.testing.assert_array_equal(got[0].reshape(-1, 8), order[:, :8])
        np.testing.assert_array_equal(got[1].reshape(-1, 8), order[:, 8:])


@pytest.mark.slow
def test_fit_resumes_a_two_process_run_on_one_device(two_processes):
    _, run_dir = two_processes
    config = fit_config()
    model, _, _, data, key = setup(FIT_DIM)
    one_device = parallel.make_mesh(data=1)

    # Uninterrupted, on one device.
    want_losses: dict[int, float] = {}
    want = fit(model, data, None, config, key=key, mesh=one_device, max_steps=2 * FIT_STEPS, progress=False,
               handle_signals=False, on_step=lambda step, m: want_losses.__setitem__(step, m["loss"]))

    # The two processes wrote one record per step and one checkpoint between them (process 0 only).
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train")]
    for record in records:
        assert record["loss"] == pytest.approx(want_losses[record["step"]], abs=LOSS_TOL)
    assert [c.step for c in list_checkpoints(run_dir / "checkpoints")] == [FIT_STEPS]

    # Saved from 4 devices over 2 processes with fsdp-sharded weights; resumed on 1 device of this process.
    resumed_losses: dict[int, float] = {}
    resumed = fit(model, data, None, config, key=key, run_dir=run_dir, resume=True, mesh=one_device,
                  max_steps=2 * FIT_STEPS, progress=False, handle_signals=False,
                  on_step=lambda step, m: resumed_losses.__setitem__(step, m["loss"]))
    assert resumed.step == want.step == 2 * FIT_STEPS
    assert sorted(resumed_losses) == [3, 4]
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(want_losses[step], abs=LOSS_TOL), step
    _assert_same_params(_host_params(resumed.model), _host_params(want.model), "resumed on one device")
    assert len(resumed.model.blocks.attn.qkv.weight.sharding.device_set) == 1


def test_fit_checks_the_batch_before_compiling():
    model, _, _, data, key = setup(FIT_DIM)
    config = dataclasses.replace(fit_config(), batch_size=12)
    with _no_compilation(), pytest.raises(parallel.MeshError, match=r"global batch of 12 does not split"):
        fit(model, data, None, config, key=key, mesh=parallel.make_mesh(data=8), progress=False)


@pytest.mark.slow
def test_checkpoint_moves_between_meshes(tmp_path):
    model, optim, _, _, key = setup()
    template = (model, optim.init(eqx.filter(model, eqx.is_array)))
    # Save from 8 devices with sharded parameters and optimiser state.
    saved_model, saved_state, _ = _train("data=4,fsdp=2", 2)
    assert {s.data.shape for s in saved_model.blocks.attn.qkv.weight.addressable_shards} == {(2, 48, 32)}
    want = _host_params(saved_model)
    save_checkpoint(
        tmp_path, model=saved_model, opt_state=saved_state, key=key, step=2, epoch=0, batch_index=2,
        shuffle_seed=0,
    )
    # Training on, on the original mesh: what every resumed run must reproduce.
    _, _, want_losses = _train("data=4,fsdp=2", 2, start=2, state=(saved_model, saved_state))

    for spec, devices in (("data=1", 1), ("data=2,fsdp=2", 4)):
        restored_model, restored_state, restored_key, info = load_checkpoint(
            tmp_path, model=template[0], opt_state=template[1]
        )
        assert info.step == 2 and [c.step for c in list_checkpoints(tmp_path)] == [2]
        assert np.array_equal(jr.key_data(restored_key), jr.key_data(key))
        mesh = _compiled(spec)[0]
        placed = parallel.shard_state(restored_model, mesh, min_size=MIN_SHARD_SIZE)
        assert len(placed.blocks.attn.qkv.weight.sharding.device_set) == devices
        # Bit for bit the saved model, on a mesh of another shape.
        for name, value in _host_params(placed).items():
            assert np.array_equal(value, want[name]), (spec, name)
        _, _, losses = _train(spec, 2, start=2, state=(restored_model, restored_state))
        np.testing.assert_allclose(losses, want_losses, rtol=LOSS_TOL, atol=LOSS_TOL, err_msg=spec)


@contextlib.contextmanager
def _no_compilation():
    events: list[str] = []

    def listen(event, duration, **kwargs):
        events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    compiled = [event for event in events if event.startswith("/jax/core/compile")]
    assert not compiled, f"something was traced or compiled before the error: {compiled}"


def test_errors_come_before_compilation():
    too_big = r"needs 16 devices but only 8 cpu devices are available"
    with _no_compilation(), pytest.raises(parallel.MeshError, match=too_big):
        parallel.make_mesh(data=16)
    with _no_compilation(), pytest.raises(parallel.MeshError, match=r"data=4, fsdp=4 needs 16 devices"):
        parallel.mesh_from_spec("data=4,fsdp=4")
    bad_specs = (
        ("data=0", "positive integer size"),
        ("tp=2", "AXIS one of"),
        ("data=2,data=2", "twice"),
        ("", "Empty mesh"),
        ("data=1.5", "positive integer"),
    )
    for bad, message in bad_specs:
        with pytest.raises(parallel.MeshError, match=message):
            parallel.parse_mesh_spec(bad)
    with pytest.raises(parallel.MeshError, match=r"fsdp=3 does not divide the 8"):
        parallel.mesh_from_spec("fsdp=3")

    # A global batch of 12 cannot be cut into 8 equal slices: refused before the step is traced.
    model, optim, _, data, key = setup()
    mesh, step, _ = _compiled("data=8")
    state = parallel.shard_state((model, optim.init(eqx.filter(model, eqx.is_array))), mesh,
                                 min_size=MIN_SHARD_SIZE)
    images, labels = data.images[:12], data.labels[:12].astype(np.int32)
    uneven = r"global batch of 12 does not split.*data=8 × fsdp=1 = 8 devices.*multiple of 8 \(e.g. 8 or 16"
    with _no_compilation(), pytest.raises(parallel.MeshError, match=uneven):
        step(*state, (images, labels), key)
    with pytest.raises(parallel.MeshError, match=r"global batch of 12"):
        parallel.check_batch_size(12, mesh)
    parallel.check_batch_size(16, mesh)


def test_initialize_distributed_settings(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name in [name for name in os.environ if name.startswith(("SLURM_", "OMPI_"))]:
        monkeypatch.delenv(name)
    assert parallel.initialize_distributed() is False  # nothing given: one process, nothing done
    assert jax.process_count() == 1
    # Under SLURM: the step's settings, as JAX reads them; a single task is one process, nothing to join.
    slurm = {"SLURM_JOB_ID": "8195", "SLURM_STEP_NODELIST": "node[007-009],gpu1", "SLURM_NTASKS": "3",
             "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert parallel.detect_cluster() == parallel.ClusterSettings("slurm", "node007:61443", 3, 2, (0,))
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "1234")  # JAX's own override of the port
    assert parallel.detect_cluster().coordinator_address == "node007:1234"
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert parallel.detect_cluster() is None
    assert parallel.initialize_distributed() is False and jax.process_count() == 1
    monkeypatch.setenv("SLURM_NTASKS", "3")
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    with pytest.raises(ValueError, match=r"missing: coordinator address, number of processes"):
        parallel.initialize_distributed()
    with pytest.raises(ValueError, match=r"process id must be in \[0, 2\) for 2 processes, got 3"):
        parallel.initialize_distributed("127.0.0.1:1234", 2, 3)
    with pytest.raises(ValueError, match=r"HOST:PORT"):
        parallel.initialize_distributed("localhost", 2, 0)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES must be an integer, got 'two'"):
        parallel.initialize_distributed()


@pytest.mark.parametrize(
    "mesh,message",
    [
        ("data=3", "--mesh data=3: The global batch of 32 does not split evenly over the mesh"),
        ("data=16", "--mesh data=16: The mesh data=16, fsdp=1 needs 16 devices but only 8 cpu devices"),
        ("data=2,tp=2", "Bad mesh entry 'tp=2'"),
    ],
)
def test_cli_refuses_a_bad_mesh_before_compiling(mesh, message, tmp_path, capsys):
    # --quick trains with a global batch of 32.
    with _no_compilation(), pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--quick", "--no-progress", "--mesh", mesh, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_trains_on_a_mesh(tmp_path, capsys):
    run_dir = tmp_path / "run"
    flags = ["--quick", "--no-progress", "--mesh", "data=2,fsdp=2", "--max-steps", "2", "--log-every", "1"]
    assert cli.main(["train", *flags, "--out", str(run_dir)]) == 0
    assert "on mesh data=2 × fsdp=2 (4 cpu devices, 1 process)" in capsys.readouterr().err
    assert [c.step for c in list_checkpoints(run_dir / "checkpoints")] == [2]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1]["step"] == 2 and np.isfinite(records[-1]["loss"])
