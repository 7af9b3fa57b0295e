"""Side-by-side speed and memory of cait_eqx and timm's CaiT on the same machine, interleaved.

For each configuration both contenders get the same architecture, the same weights (timm's random init, loaded
into cait_eqx by name), the same batch, float32 and the same CPU threads. Every measurement interleaves the
contenders round by round (alternating which goes first) so that machine noise hits both; the table shows
medians.

Measured:

- inference images/s (batch 1, 8, 32) and training-step images/s (forward + backward + AdamW);
- achieved FLOP/s (analytic matmul FLOP count × images/s) as a fraction of a measured fp32 matmul ceiling;
- compile time of the forward and the train step of cait_eqx (trace + lower, XLA compile), including the
  `cait_m48_448` structure, and torch.compile's first-call cost with `--compile`;
- peak resident memory of each contender in a fresh subprocess.

With `--huge-pages on` the whole measurement (so both contenders) runs with glibc's `glibc.malloc.hugetlb=1`,
in a child process started with it: see the README here ("Huge pages") for what it changes and by how much.

Run `python benchmarks/bench.py --help`; `benchmarks/README.md` has the commands and the results.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

CONTENDERS = ("cait_eqx", "timm", "timm_compile")
LABELS = {"cait_eqx": "cait_eqx", "timm": "timm eager", "timm_compile": "timm torch.compile"}
PARITY_TOLERANCE = 1e-4  # max |Δlogit| / max |logit|: a wrong weight mapping or layer is off by far more


@dataclasses.dataclass(frozen=True)
class Bench:
    """One model configuration to benchmark, described once for both libraries."""

    key: str
    title: str
    image_size: int
    patch_size: int
    dim: int
    depth: int
    heads: int
    num_classes: int
    infer_batches: tuple[int, ...]
    train_batch: int
    # a named variant: timm.create_model(name) and cait_eqx's variant of that name
    timm_name: str | None = None
    cls_depth: int = 2
    mlp_ratio: int = 4

    def timm_kwargs(self) -> dict[str, Any]:
        return dict(
            img_size=self.image_size,
            patch_size=self.patch_size,
            embed_dim=self.dim,
            depth=self.depth,
            num_heads=self.heads,
            mlp_ratio=self.mlp_ratio,
            depth_token_only=self.cls_depth,
            num_classes=self.num_classes,
            init_values=1e-5,
        )

    def eqx_kwargs(self) -> dict[str, Any]:
        return dict(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_classes=self.num_classes,
            dim=self.dim,
            depth=self.depth,
            cls_depth=self.cls_depth,
            heads=self.heads,
            mlp_dim=self.mlp_ratio * self.dim,
            init_values=1e-5,
        )


BENCHES = {
    "xxs24": Bench(
        "xxs24", "cait_xxs24_224", 224, 16, 192, 24, 4, 1000, (1, 8, 32), 16, timm_name="cait_xxs24_224"
    ),
    "s24": Bench("s24", "cait_s24_224", 224, 16, 384, 24, 8, 1000, (1, 8, 32), 16, timm_name="cait_s24_224"),
    "small": Bench(
        "small", "small 32×32 (d192, depth 12, 4 heads, p4)", 32, 4, 192, 12, 4, 10, (1, 8, 32, 256), 128
    ),
    # --quick (CI): a tiny model, to keep the script working, not to measure anything.
    "tiny": Bench("tiny", "tiny 32×32 (d64, depth 2, p8) [quick]", 32, 8, 64, 2, 4, 10, (1, 8), 8),
}

# Compile-time structures: (key, title, bench or variant name, forward batch, train batch).
COMPILE_FULL = [
    ("xxs24", "cait_xxs24_224", "cait_xxs24_224", 8, 16),
    ("m48", "cait_m48_448", "cait_m48_448", 8, 16),
    ("small", BENCHES["small"].title, BENCHES["small"], 8, 128),
]
COMPILE_QUICK = [
    ("tiny", BENCHES["tiny"].title, BENCHES["tiny"], 2, 4),
    ("tiny_deep", "tiny, depth 12 [quick]", dataclasses.replace(BENCHES["tiny"], depth=12), 2, 4),
]


# ---------------------------------------------------------------------------------------------------- helpers


def pin_threads(threads: int) -> list[int]:
    """Restrict this process (and so XLA's and torch's thread pools) to `threads` CPUs; call before
    imports."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
        raise SystemExit(f"--threads {threads} asks for more CPUs than this process may use ({len(cpus)}).")
    chosen = cpus[:threads]
    os.sched_setaffinity(0, chosen)
    # torch reads these for its OpenMP pool; XLA's CPU client sizes its pool from the affinity mask.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    return chosen


HUGETLB = "glibc.malloc.hugetlb"


_RESTARTED = "CAIT_EQX_BENCH_RESTARTED"


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (`always`, `madvise` or `never`), or None where unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def tunables_with_hugetlb(tunables: str, on: bool) -> str:
    """`tunables` (a `GLIBC_TUNABLES` value) with `glibc.malloc.hugetlb` set to 1 (`on`) or 0, others kept."""
    items = [i for i in tunables.split(":") if i and i.split("=", 1)[0] != HUGETLB]
    return ":".join([*items, f"{HUGETLB}={1 if on else 0}"])


def ensure_huge_pages(on: bool) -> None:
    """Return if glibc's `glibc.malloc.hugetlb` tunable is already 1 (`on`) or 0 in this process; otherwise
    run this same command in a child process whose environment sets it, and exit with the child's status.

    glibc reads its tunables only at start-up, so a process cannot change its own; the child is started with
    the tunable (this process is not re-executed) and does all the work, with this process's standard streams.
    """
    items = [i for i in os.environ.get("GLIBC_TUNABLES", "").split(":") if i]
    current = next((i.split("=", 1)[1] for i in items if i.split("=", 1)[0] == HUGETLB), "0")
    want = "1" if on else "0"
    if current == want:
        return
    if _RESTARTED in os.environ:  # glibc's secure mode (setuid/capabilities) erases the tunable: do not loop
        raise SystemExit(
            f"--huge-pages {'on' if on else 'off'}: the child process still has GLIBC_TUNABLES="
            f"{os.environ.get('GLIBC_TUNABLES', '')!r}; this interpreter (glibc secure mode?) drops the "
            "tunable. Run without --huge-pages on, or with an interpreter that keeps GLIBC_TUNABLES."
        )
    tunables = tunables_with_hugetlb(os.environ.get("GLIBC_TUNABLES", ""), on)
    env = dict(os.environ, GLIBC_TUNABLES=tunables, **{_RESTARTED: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(subprocess.run([sys.executable, *sys.orig_argv[1:]], env=env).returncode)


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_kind() -> tuple[str, str]:
    """The CPU's model name and its widest x86 vector extension ("AVX-512", "AVX2" or "neither"), from
    /proc/cpuinfo: XLA's code and the speed ratios differ between AVX2 and AVX-512 machines."""
    name, flags, family, model = "unknown CPU", set(), None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "model name" and name == "unknown CPU":
                    name = value
                elif key == "flags" and not flags:
                    flags = set(value.split())
                elif key == "cpu family" and family is None:
                    family = value
                elif key == "model" and model is None:
                    model = value
    except OSError:
        pass
    if family is not None and model is not None:
        # The model name of a virtual machine's CPU may say only "AMD EPYC": family and model tell the
        # generation (AMD family 25 is Zen 3 and Zen 4, 26 is Zen 5).
        name = f"{name}, family {family} model {model}"
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "neither"
    return name, isa


def machine_meta() -> dict:
    """What every benchmark records of the machine its figures come from: the CPU's model name, its widest
    vector extension, and the XLA flags in force (XLA's code, and so the ratios, differ with each)."""
    cpu, isa = cpu_kind()
    return dict(cpu=cpu, isa=isa, xla_flags=os.environ.get("XLA_FLAGS", ""))


def machine_line(meta: dict) -> str:
    """`machine_meta()`'s fields as the opening words of a table's header line."""
    return (f"{meta.get('cpu', '?')} ({meta.get('isa', 'vector extensions not recorded')}); "
            f"XLA_FLAGS={meta.get('xla_flags', 'not recorded')!r}")


def source_meta() -> dict:
    """Where the measured `cait_eqx` is (found without importing it) and a digest of its Python files."""
    import hashlib
    import importlib.util
    from pathlib import Path

    root = Path(importlib.util.find_spec("cait_eqx").submodule_search_locations[0])
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return dict(cait_eqx_path=str(root), cait_eqx_source_sha256=digest.hexdigest()[:16])


@contextlib.contextmanager
def holding(lock: str | None):
    """Hold an exclusive `flock` on the file `lock` (created if missing) while inside; nothing if None."""
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_worker(
    script: str,
    spec: Any,
    *,
    args: tuple[str, ...] = (),
    flag: str = "--worker",
    env: dict[str, str] | None = None,
    lock: str | None = None,
    timeout: float = 1800,
) -> Any:
    """Run one measurement in a fresh Python process and return what it printed last, as JSON.

    Runs `python SCRIPT *args FLAG JSON(spec)` (the script's own worker mode) with `env` added to this
    process's environment, holding the CPU lock `lock` (if given) for just that process, so a long series of
    workers lets other work in between. A fresh process gives each measurement its own peak memory and its own
    start-up settings (XLA flags, allocator tunables), which one process cannot undo.

    **Raises:** `SystemExit` with the command and the tail of its stderr when the worker fails.
    """
    cmd = [sys.executable, os.path.abspath(script), *args, flag, json.dumps(spec)]
    with holding(lock):
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                              timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def answered_without_measuring(args, markdown: Callable[[dict], str], worker: Callable | None = None) -> bool:
    """The modes of a benchmark script that run no series of measurements: `--table JSON` prints an earlier
    run's table; `--worker SPEC` (with `worker`) runs one measurement in this process, on `--threads` pinned
    threads, and prints its JSON (what `run_worker` reads back). Pins this process's threads when there is a
    `--threads` flag and no table to print. True when the script has nothing left to do.
    """
    if getattr(args, "table", None):
        with open(args.table) as f:
            print(markdown(json.load(f)), end="")
        return True
    if getattr(args, "threads", None) is not None:
        pin_threads(args.threads)
    if worker is not None and getattr(args, "worker", None):
        print(json.dumps(worker(json.loads(args.worker))))
        return True
    return False


def write_json_atomic(path: str, data: Any) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".bench-", suffix=".json")
    try:
        # mkstemp creates the file readable by its owner only; a result file is for everyone (umask applies).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def head_mix_flops(cfg) -> int:
    """FLOPs of one SA block's two talking-heads mixes (`Linear(heads, heads)` over `(heads, N, N)` maps).

    Counted as matrix products (`2·h²·N²` each) whichever way they are computed: up to
    `cait_eqx._layers.UNROLL_HEAD_MIX` heads cait_eqx writes them out as scaled sums, which a count of the
    traced program's matrix products does not see.
    """
    n = cfg.num_patches
    return 2 * 2 * cfg.heads * cfg.heads * n * n if cfg.talking_heads else 0


def forward_flops(cfg) -> int:
    """Matmul FLOPs (2·m·n·k) of one image's forward pass; elementwise work (softmax, norms, GELU) not
    counted.

    `cfg` is a `cait_eqx.CaiTConfig`. The training step is counted as 3× this (the backward pass does two
    matmuls per forward matmul).
    """
    n = cfg.num_patches
    d, h, dh = cfg.dim, cfg.heads, cfg.dim_head
    inner = h * dh
    patch = 2 * n * (cfg.channels * cfg.patch_size**2) * d
    sa = (
        2 * n * d * 3 * inner  # qkv
        + 2 * h * n * n * dh  # q kᵀ
        + head_mix_flops(cfg)  # proj_l, proj_w over the head axis
        + 2 * h * n * n * dh  # attn v
        + 2 * n * inner * d  # proj
        + 2 * 2 * n * d * cfg.mlp_dim  # fc1, fc2
    )
    t = n + 1
    ca = (
        2 * d * inner  # q (class token only)
        + 2 * 2 * t * d * inner  # k, v
        + 2 * 2 * h * t * dh  # q kᵀ and attn v for one query
        + 2 * inner * d  # proj
        + 2 * 2 * d * cfg.cls_mlp_dim  # fc1, fc2 (class token only)
    )
    head = 2 * d * cfg.num_classes
    return patch + cfg.depth * sa + cfg.cls_depth * ca + head


def traced_matmul_flops(jaxpr) -> int:
    """Matmul FLOPs of a traced program: `2·m·n·k` for every `dot_general` and convolution in a jaxpr.

    Nested programs are walked too (`pjit`, `custom_jvp`/`custom_vjp`, `checkpoint`, ...), a `scan` body
    counted `length` times. An independent check of `forward_flops`: it counts what the model really computes,
    not what the formula says it should.
    """
    from jax.extend import core as jcore

    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contract)
        elif name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape  # (out, in, *window) in JAX's default layout
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel[1:])
        times = eqn.params["length"] if name == "scan" else 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    total += times * traced_matmul_flops(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    total += times * traced_matmul_flops(sub)
    return total


def interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int, target_s: float, min_calls: int = 1, round_warmup: int = 0
) -> dict[str, dict[str, Any]]:
    """Time each zero-argument callable (which must block until its result exists), interleaving them.

    Each is called once to warm up (its time is kept as `first_call_s`: compilation for the JIT contenders),
    once more to calibrate how many calls (at least `min_calls`) make one round of about `target_s`, then
    `rounds` rounds in alternating order. Each round of a contender starts with `round_warmup` untimed calls
    (their mean time is kept as `round_warmup_s`, one entry per round), then times its calls back to back.
    Returns per contender: seconds per timed call of each round, the median, `first_call_s`, `round_warmup_s`
    and `timed_calls_per_round`.
    """
    first, per_call, reps, warm = {}, {}, {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        single = time.perf_counter() - t0
        reps[name] = max(min_calls, 1, round(target_s / max(single, 1e-9)))
        per_call[name], warm[name] = [], []
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = fns[name]
            if round_warmup:
                t0 = time.perf_counter()
                for _ in range(round_warmup):
                    fn()
                warm[name].append((time.perf_counter() - t0) / round_warmup)
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            per_call[name].append((time.perf_counter() - t0) / reps[name])
    return {
        name: dict(
            seconds=per_call[name],
            median_s=statistics.median(per_call[name]),
            first_call_s=first[name],
            round_warmup_s=warm[name],
            timed_calls_per_round=reps[name],
        )
        for name in names
    }


# --------------------------------------------------------------------------------------------- the contenders


def build_timm(bench: Bench, torch_seed: int = 0):
    import timm
    import torch
    from timm.models.cait import Cait

    torch.manual_seed(torch_seed)
    if bench.timm_name is not None:
        return timm.create_model(bench.timm_name, pretrained=False)
    return Cait(**bench.timm_kwargs())


def eqx_inference_fn():
    """The package's batched inference: `cait_eqx.batched(model)`, a large batch in chunks of
    `cait_eqx.auto_chunk(model.config)` images (a batch no larger than that is `jax.vmap(model)` itself)."""
    import equinox as eqx

    import cait_eqx

    @eqx.filter_jit
    def infer(model, x):
        return cait_eqx.batched(model)(x)

    return infer


def eqx_train_step(optim, forward: Callable[[Any, Any], Any] | None = None, chunk: int | str | None = None):
    """The canonical Equinox step: value_and_grad over the model, optax on its array leaves. `forward(model,
    images)` gives the batch's logits (default `jax.vmap(model)(images)`). `chunk`: `None`, the gradient
    by `eqx.filter_value_and_grad` over the whole batch; else by `cait_eqx.chunked_value_and_grad(...,
    chunk=chunk)` (`"auto"`: the model's `auto_train_chunk` on one CPU device), in parts of that many."""
    import equinox as eqx
    import jax
    import optax

    def loss_fn(m, x, y):
        logits = jax.vmap(m)(x) if forward is None else forward(m, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    if chunk is None:
        value_and_grad = eqx.filter_value_and_grad(loss_fn)
    else:
        import cait_eqx

        value_and_grad = cait_eqx.chunked_value_and_grad(loss_fn, chunk=chunk)

    def step(batch, model, opt_state):
        x, y = batch
        loss, grads = value_and_grad(model, x, y)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    return step


def make_optax():
    import optax

    return optax.adamw(1e-4, weight_decay=0.05)


class EqxRunner:
    """cait_eqx: jitted `cait_eqx.batched` inference, and a donated train step holding its state."""

    def __init__(self, model, train_chunk: int | str | None = "auto"):
        import equinox as eqx

        self.model = eqx.nn.inference_mode(model)
        self.infer = eqx_inference_fn()
        self.optim = make_optax()
        self.step = eqx.filter_jit(eqx_train_step(self.optim, chunk=train_chunk), donate="all-except-first")
        self.train_state: list[Any] | None = None

    def inference(self, x) -> Callable[[], Any]:
        return lambda: self.infer(self.model, x).block_until_ready()

    def train(self, x, y) -> Callable[[], Any]:
        import equinox as eqx
        import jax

        model = eqx.nn.inference_mode(self.model, value=False)
        # A private copy: the step donates (consumes) its model and optimiser state.
        model = jax.tree_util.tree_map(lambda a: a.copy() if eqx.is_array(a) else a, model)
        state = [model, self.optim.init(eqx.filter(model, eqx.is_array))]

        def call():
            state[0], state[1], loss = self.step((x, y), state[0], state[1])
            loss.block_until_ready()

        return call


class TorchRunner:
    """timm: `inference_mode` forward, and the standard zero_grad/backward/AdamW.step loop."""

    def __init__(self, model, compiled: bool):
        import torch

        self.torch = torch
        self.base = model
        self.compiled = compiled
        if compiled:
            # torch.compile falls back to eager, with only a warning, once one function has been compiled
            # `recompile_limit` (8) times, and timm's `Cait.forward` is one function for every shape and for
            # both grad modes: the ninth shape of a run would be timed eager under the compiled label. Make
            # that an error, and give each shape a fresh compiler (`_compile`).
            torch._dynamo.config.fail_on_recompile_limit_hit = True

    def _compile(self, model):
        """`model` under torch.compile from a clean compiler cache: one shape's compile, never eager."""
        self.torch._dynamo.reset()
        return self.torch.compile(model, dynamic=False)

    def _module(self):
        return self._compile(self.base) if self.compiled else self.base

    def inference(self, x) -> Callable[[], Any]:
        torch = self.torch
        self.base.eval()
        module = self._module()  # one compiled module per shape, so first_call_s is that shape's compile

        def call():
            with torch.inference_mode():
                return module(x)

        return call

    def train(self, x, y) -> Callable[[], Any]:
        import copy

        torch = self.torch
        model = copy.deepcopy(self.base).train()
        module = self._compile(model) if self.compiled else model
        optim = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

        def call():
            optim.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(module(x), y)
            loss.backward()
            optim.step()
            return loss

        return call


# ----------------------------------------------------------------------------------------------- measurements


def matmul_ceiling(n: int, reps: int) -> dict[str, float]:
    """GFLOP/s of an n×n by n×n float32 matmul in NumPy, torch and JAX (best of `reps`), and their maximum."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    jmm = jax.jit(jnp.matmul)
    jmm(ja, jb).block_until_ready()
    fns = {
        "numpy": lambda: a @ b,
        "torch": lambda: ta @ tb,
        "jax": lambda: jmm(ja, jb).block_until_ready(),
    }
    out = {}
    for name, fn in fns.items():
        fn()
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n**3 / best / 1e9
    out["max"] = max(out.values())
    out["n"] = n
    return out


def run_throughput(bench: Bench, args, ceiling_gflops: float) -> tuple[list[dict], dict, list[dict]]:
    """Parity check, then interleaved inference and train-step timings of one configuration."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import cait_eqx

    tmodel = build_timm(bench).eval()
    sd = tmodel.state_dict()
    emodel = cait_eqx.from_timm_state_dict(sd, name=bench.timm_name, image_size=bench.image_size)
    gflop_fwd = forward_flops(emodel.config) / 1e9

    rng = np.random.default_rng(0)
    xs = rng.standard_normal((2, 3, bench.image_size, bench.image_size), dtype=np.float32)
    with torch.inference_mode():
        ref = tmodel(torch.from_numpy(xs)).numpy()
    ours = np.asarray(jax.vmap(emodel)(jnp.asarray(xs)))
    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
    parity = dict(config=bench.key, title=bench.title, max_rel_diff=rel, tolerance=PARITY_TOLERANCE)
    _log(f"[{bench.key}] parity with timm: max relative logit difference {rel:.2e}")
    if not rel <= PARITY_TOLERANCE:
        raise SystemExit(
            f"[{bench.key}] cait_eqx and timm disagree (max rel diff {rel:.2e}); not benchmarking."
        )

    runners = {
        "cait_eqx": EqxRunner(emodel, train_chunk=args.train_chunk),
        "timm": TorchRunner(tmodel, compiled=False),
    }
    if args.compile:
        runners["timm_compile"] = TorchRunner(tmodel, compiled=True)

    rows, compile_rows = [], []
    workloads = [("inference", b) for b in bench.infer_batches] + [("train", bench.train_batch)]
    for workload, batch in workloads:
        x_np = rng.standard_normal((batch, 3, bench.image_size, bench.image_size), dtype=np.float32)
        y_np = rng.integers(0, bench.num_classes, size=(batch,))
        fns = {}
        for name, runner in runners.items():
            if name == "cait_eqx":
                x, y = jnp.asarray(x_np), jnp.asarray(y_np, dtype=jnp.int32)
            else:
                x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
            fns[name] = runner.inference(x) if workload == "inference" else runner.train(x, y)
        _log(f"[{bench.key}] {workload} batch {batch}: timing {', '.join(fns)} ...")
        min_calls = args.train_calls if workload == "train" else 1
        timings = interleaved(fns, args.rounds, args.target_s, min_calls, args.round_warmup)
        gflop = gflop_fwd * (3 if workload == "train" else 1)
        for name, t in timings.items():
            ips = batch / t["median_s"]
            rows.append(
                dict(
                    config=bench.key,
                    title=bench.title,
                    workload=workload,
                    batch=batch,
                    contender=name,
                    images_per_s=ips,
                    median_step_s=t["median_s"],
                    step_s=t["seconds"],
                    first_call_s=t["first_call_s"],
                    round_warmup_s=t["round_warmup_s"],
                    timed_calls_per_round=t["timed_calls_per_round"],
                    round_warmup_calls=args.round_warmup,
                    gflop_per_image=gflop,
                    gflops=gflop * ips,
                    fraction_of_ceiling=gflop * ips / ceiling_gflops,
                )
            )
            _log(f"    {name:>12}: {ips:9.2f} images/s (median of {len(t['seconds'])} rounds)")
            if name == "timm_compile":
                compile_rows.append(
                    dict(
                        structure=bench.key,
                        title=bench.title,
                        workload=workload,
                        batch=batch,
                        contender=name,
                        trace_s=None,
                        compile_s=None,
                        total_s=t["first_call_s"] - t["median_s"],
                        how="first call − median call",
                    )
                )
    return rows, parity, compile_rows


def compile_times(structures, rounds: int) -> list[dict]:
    """Trace+lower and XLA-compile seconds of cait_eqx's forward and train step, on abstract shapes.

    Nothing is executed and no weights are allocated, so even `cait_m48_448` at 448×448 costs no memory.
    A fresh function per repetition defeats JAX's caches; the structures are interleaved.
    """
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    import cait_eqx

    def abstract_model(spec):
        if isinstance(spec, Bench):
            return eqx.filter_eval_shape(lambda: cait_eqx.CaiT(**spec.eqx_kwargs(), key=jr.key(0)))
        return eqx.filter_eval_shape(lambda: cait_eqx.create_model(spec, key=jr.key(0)))

    def is_leaf_array(x):
        return isinstance(x, jax.ShapeDtypeStruct)

    def lowerers(model, fwd_batch, train_batch):
        cfg = model.config
        shape = (cfg.channels, *cfg.image_size)
        infer_model = eqx.nn.inference_mode(model)
        fparams, fstatic = eqx.partition(infer_model, is_leaf_array)
        tparams, tstatic = eqx.partition(eqx.nn.inference_mode(model, value=False), is_leaf_array)
        optim = make_optax()
        opt_state = jax.eval_shape(optim.init, tparams)
        xf = jax.ShapeDtypeStruct((fwd_batch, *shape), jnp.float32)
        xt = jax.ShapeDtypeStruct((train_batch, *shape), jnp.float32)
        yt = jax.ShapeDtypeStruct((train_batch,), jnp.int32)

        def forward():
            fn = jax.jit(lambda p, x: jax.vmap(eqx.combine(p, fstatic))(x))
            return fn.lower(fparams, xf)

        def train():
            step = eqx_train_step(optim)

            def flat(batch, p, s):
                m, s, loss = step(batch, eqx.combine(p, tstatic), s)
                return eqx.filter(m, eqx.is_array), s, loss

            return jax.jit(flat, donate_argnums=(1, 2)).lower((xt, yt), tparams, opt_state)

        return {("forward", fwd_batch): forward, ("train", train_batch): train}

    jobs = []
    for key, title, spec, fb, tb in structures:
        for (workload, batch), lower in lowerers(abstract_model(spec), fb, tb).items():
            jobs.append(
                dict(structure=key, title=title, workload=workload, batch=batch, lower=lower, t=[], c=[])
            )
    for r in range(rounds):
        for job in jobs if r % 2 == 0 else jobs[::-1]:
            t0 = time.perf_counter()
            lowered = job["lower"]()
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            job["t"].append(t1 - t0)
            job["c"].append(t2 - t1)
            _log(f"[compile] {job['structure']} {job['workload']} batch {job['batch']}: {t1 - t0:.2f} s "
                 f"trace+lower, {t2 - t1:.2f} s compile")
    rows = []
    for job in jobs:
        trace, comp = statistics.median(job["t"]), statistics.median(job["c"])
        rows.append(
            dict(
                structure=job["structure"],
                title=job["title"],
                workload=job["workload"],
                batch=job["batch"],
                contender="cait_eqx",
                trace_s=trace,
                compile_s=comp,
                total_s=statistics.median([a + b for a, b in zip(job["t"], job["c"], strict=True)]),
                how="jax.jit(...).lower(abstract shapes).compile()",
            )
        )
    return rows


def memory_worker(spec: dict) -> dict:
    """Runs in a fresh process: one contender, one configuration; reports resident-set sizes in MB."""
    import numpy as np

    bench = BENCHES[spec["config"]]
    contender = spec["contender"]
    rng = np.random.default_rng(0)
    xi = rng.standard_normal((spec["infer_batch"], 3, bench.image_size, bench.image_size), dtype=np.float32)
    xt = rng.standard_normal((bench.train_batch, 3, bench.image_size, bench.image_size), dtype=np.float32)
    yt = rng.integers(0, bench.num_classes, size=(bench.train_batch,))
    rss_start = _proc_status_mb("VmRSS")
    if contender == "cait_eqx":
        import jax.numpy as jnp
        import jax.random as jr

        import cait_eqx

        runner = EqxRunner(cait_eqx.CaiT(**bench.eqx_kwargs(), key=jr.key(0)))
        infer = runner.inference(jnp.asarray(xi))
        train = runner.train(jnp.asarray(xt), jnp.asarray(yt, dtype=jnp.int32))
    else:
        import torch

        runner = TorchRunner(build_timm(bench), compiled=False)
        infer = runner.inference(torch.from_numpy(xi))
        train = runner.train(torch.from_numpy(xt), torch.from_numpy(yt))
    rss_setup = _proc_status_mb("VmRSS")
    infer()  # compile / first-call allocations happen here, before the peak mark is reset
    train()
    out = dict(config=bench.key, title=bench.title, contender=contender, rss_imports_mb=rss_start,
               rss_setup_mb=rss_setup, infer_batch=spec["infer_batch"], train_batch=bench.train_batch)
    # VmHWM, not getrusage: ru_maxrss survives fork+exec and would report the parent's peak.
    out["warmup_peak_mb"] = _proc_status_mb("VmHWM")
    resettable = _reset_peak_rss()
    out["steady_state_peaks"] = resettable
    for name, fn in (("infer", infer), ("train", train)):
        _reset_peak_rss()
        base = _proc_status_mb("VmRSS")
        for _ in range(2):
            fn()
        out[f"{name}_base_mb"] = base
        # The kernel updates its mark lazily (on unmaps), so it can read a little below an RSS seen since the
        # reset: the peak is at least every RSS observed.
        seen = max(base, _proc_status_mb("VmRSS"))
        out[f"{name}_peak_mb"] = max(_proc_status_mb("VmHWM"), seen) if resettable else None
    return out


def run_memory(bench: Bench, args) -> list[dict]:
    rows = []
    infer_batch = max(bench.infer_batches)
    for contender in ("cait_eqx", "timm"):
        spec = dict(config=bench.key, contender=contender, infer_batch=infer_batch)
        _log(f"[{bench.key}] memory of {contender} in a subprocess ...")
        rows.append(run_worker(__file__, spec, args=("--threads", str(args.threads), "--huge-pages",
                                                     args.huge_pages), flag="--memory-worker", timeout=900))
    return rows


# ----------------------------------------------------------------------------------------------------- tables


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}"


def images_per_s_counting_warmup(row: dict) -> float | None:
    """A throughput row's images/s had each round's untimed opening calls been timed too: the median over
    rounds of the mean over all of the round's calls. None where the row has no warm-up calls on record."""
    w, n, warm = row.get("round_warmup_calls"), row.get("timed_calls_per_round"), row.get("round_warmup_s")
    if not (w and n and warm and len(warm) == len(row["step_s"])):
        return None
    means = [(w * a + n * b) / (w + n) for a, b in zip(warm, row["step_s"], strict=True)]
    return row["batch"] / statistics.median(means)


def ratio_rows(results: dict) -> list[dict]:
    """One row per (config, workload, batch): images/s of every contender and cait_eqx's ratios; also the
    ratio to timm eager counting each round's untimed opening calls (`images_per_s_counting_warmup`), where
    known."""
    grouped: dict[tuple, dict] = {}
    for r in results.get("throughput", []):
        k = (r["config"], r["workload"], r["batch"])
        grouped.setdefault(
            k, dict(config=r["config"], title=r["title"], workload=r["workload"], batch=r["batch"])
        )
        grouped[k][r["contender"]] = r
    out = []
    for g in grouped.values():
        row = dict(config=g["config"], title=g["title"], workload=g["workload"], batch=g["batch"])
        for c in CONTENDERS:
            row[c] = g[c]["images_per_s"] if c in g else None
            row[c + "_fraction"] = g[c]["fraction_of_ceiling"] if c in g else None
        for c in ("timm", "timm_compile"):
            row["ratio_vs_" + c] = row["cait_eqx"] / row[c] if row.get(c) and row.get("cait_eqx") else None
        both = [images_per_s_counting_warmup(g[c]) if c in g else None for c in ("cait_eqx", "timm")]
        row["ratio_vs_timm_counting_warmup"] = both[0] / both[1] if None not in both else None
        out.append(row)
    return out


def markdown(results: dict) -> str:
    lines = []
    meta = results.get("meta", {})
    if meta:
        lines.append(
            f"Machine: {machine_line(meta)}, "
            f"{meta.get('threads')} threads; jax {meta.get('jax')}, equinox "
            f"{meta.get('equinox')}, torch {meta.get('torch')}, timm {meta.get('timm')}; float32; medians of "
            f"{meta.get('rounds')} interleaved rounds"
            + (f", each opening with {meta['round_warmup_calls']} untimed call(s) per contender"
               if meta.get("round_warmup_calls") else "")
            + "."
            + (f" cait_eqx's training step takes its gradient in parts (--train-chunk "
               f"{meta['train_chunk'] if meta['train_chunk'] is not None else 'none'})."
               if "train_chunk" in meta else "")
            + (f" GLIBC_TUNABLES={meta['glibc_tunables']} (both contenders), transparent huge pages "
               f"`{meta.get('transparent_huge_pages')}`." if meta.get("glibc_tunables") else "")
        )
        lines.append("")
    ceiling = results.get("ceiling")
    if ceiling:
        lines.append(
            f"Matmul ceiling ({ceiling['n']}² fp32, best of runs): numpy {ceiling['numpy']:.1f}, torch "
            f"{ceiling['torch']:.1f}, jax {ceiling['jax']:.1f} GFLOP/s → ceiling {ceiling['max']:.1f} "
            "GFLOP/s."
        )
        lines.append("")
    rows = ratio_rows(results)
    if rows:
        has_compile = any(r["timm_compile"] is not None for r in rows)
        has_warmup = any(r["ratio_vs_timm_counting_warmup"] is not None for r in rows)
        head = ["config", "workload", "batch", "cait_eqx img/s", "timm eager img/s", "cait_eqx / timm"]
        if has_warmup:
            head += ["… counting each round's first call"]
        if has_compile:
            head += ["timm compile img/s", "cait_eqx / compile"]
        head += ["cait_eqx % ceiling", "timm % ceiling"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["title"], r["workload"], str(r["batch"]), _fmt(r["cait_eqx"]), _fmt(r["timm"]),
                     _fmt(r["ratio_vs_timm"]) + "×"]
            if has_warmup:
                w = r["ratio_vs_timm_counting_warmup"]
                cells += [_fmt(w) + "×" if w is not None else "–"]
            if has_compile:
                cells += [_fmt(r["timm_compile"]), _fmt(r["ratio_vs_timm_compile"]) + "×"]
            cells += [_pct(r["cait_eqx_fraction"]), _pct(r["timm_fraction"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    comp = results.get("compile", [])
    if comp:
        base = {(c["workload"]): c["total_s"] for c in comp if c["structure"] in ("xxs24", "tiny")
                and c["contender"] == "cait_eqx"}
        head = ["structure", "contender", "workload", "batch", "trace+lower s", "compile s", "total s",
                "× xxs24" if any(c["structure"] == "xxs24" for c in comp) else "× first"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in comp:
            rel = (c["total_s"] / base[c["workload"]]
                   if c["contender"] == "cait_eqx" and c["workload"] in base else None)
            lines.append("| " + " | ".join([
                c["title"], LABELS[c["contender"]], c["workload"], str(c["batch"]), _fmt(c["trace_s"]),
                _fmt(c["compile_s"]), _fmt(c["total_s"]), (_fmt(rel) + "×") if rel is not None else "–",
            ]) + " |")
        lines.append("")
    mem = results.get("memory", [])
    if mem:
        head = ["config", "contender", "RSS after imports + model MB", "peak incl. first calls MB",
                "inference: peak (+ over base) MB", "train step: peak (+ over base) MB"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in mem:
            cells = [m["title"], LABELS[m["contender"]], _fmt(m["rss_setup_mb"], 0),
                     _fmt(m["warmup_peak_mb"], 0)]
            for w in ("infer", "train"):
                peak, base = m[f"{w}_peak_mb"], m[f"{w}_base_mb"]
                delta = None if peak is None else peak - base
                cells.append(f"{_fmt(peak, 0)} (+{_fmt(delta, 0)}) at batch {m[w + '_batch']}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    par = results.get("parity", [])
    if par:
        lines.append("Parity (same weights, 2 images): " + "; ".join(
            f"{p['title']} max rel. logit diff {p['max_rel_diff']:.1e}" for p in par) + ".")
    return "\n".join(lines).rstrip() + "\n"


def _pct(v):
    return "–" if v is None else f"{100 * v:.0f}%"


def merge(paths: list[str]) -> dict:
    merged: dict[str, Any] = {}
    for p in paths:
        with open(p) as f:
            data = json.load(f)
        for k, v in data.items():
            if isinstance(v, list):
                merged.setdefault(k, []).extend(v)
            else:
                merged.setdefault(k, v)
    return merged


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------- main


def train_chunk_arg(text: str) -> int | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected auto, none or a whole number >= 1, got {text!r}")
    return int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="xxs24,s24,small,compile,memory",
                   help="comma list of parts: xxs24, s24, small (throughput + parity), compile, memory "
                        "(memory of the chosen configs, or of all three when none is chosen)")
    p.add_argument("--quick", action="store_true", help="CI mode: a tiny model, one round, every part")
    p.add_argument("--compile", action="store_true",
                   help="add timm with torch.compile (slow: ~1 min per shape)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds per measurement (median reported)")
    p.add_argument("--target-s", type=float, default=1.0, help="seconds per contender per round (≥ 1 call)")
    p.add_argument("--compile-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both libraries (affinity + torch)")
    p.add_argument("--train-calls", type=int, default=3,
                   help="timed consecutive train steps per contender per round (at least): training runs its "
                        "steps back to back")
    p.add_argument("--round-warmup", type=int, default=1,
                   help="untimed calls at the start of every round of every contender (default 1): on these "
                        "machines the first call after a pause is slower, which a training loop does not pay "
                        "(see benchmarks/README.md; the table's last ratio column counts it); 0 times "
                        "every call")
    p.add_argument("--huge-pages", choices=("on", "off"), default="off",
                   help="on: run the whole process (both contenders) with glibc's malloc asking for "
                        "transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1); off (the default): "
                        "glibc's default, as a plain process has it. Where the environment says otherwise, "
                        "the measurement runs in a child process started with the setting")
    p.add_argument("--train-chunk", type=train_chunk_arg, default="auto",
                   help="cait_eqx's training step: its gradient in parts of at most N images "
                        "(cait_eqx.chunked_value_and_grad); auto (the default): the model's "
                        "cait_eqx.auto_train_chunk on one CPU device; none: the whole batch at once "
                        "(eqx.filter_value_and_grad)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--table", nargs="+", metavar="JSON", help="only print the table of earlier --json files")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        print(markdown(merge(args.table)), end="")
        return 0
    if args.round_warmup < 0:
        raise SystemExit(f"--round-warmup must be 0 or more, got {args.round_warmup}")
    if args.train_calls < 1:
        raise SystemExit(f"--train-calls must be at least 1, got {args.train_calls}")
    ensure_huge_pages(args.huge_pages == "on")
    cpus = pin_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0

    import equinox
    import jax
    import numpy as np
    import timm
    import torch

    import cait_eqx

    torch.set_num_threads(args.threads)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if args.quick:
        parts = ["tiny", "compile", "memory"]
        args.rounds, args.compile_rounds, args.target_s = 1, 1, min(args.target_s, 0.05)
    unknown = set(parts) - set(BENCHES) - {"compile", "memory"}
    if unknown:
        raise SystemExit(
            f"--only: unknown part(s) {sorted(unknown)}; choose from xxs24, s24, small, compile, memory"
        )
    configs = [BENCHES[p] for p in parts if p in BENCHES]

    cpu, isa = cpu_kind()
    results: dict[str, Any] = dict(
        meta=dict(
            command=" ".join([os.path.basename(sys.executable), *sys.argv]),
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            cpu=cpu,
            isa=isa,
            machine=platform.machine(),
            threads=args.threads,
            train_chunk=args.train_chunk,
            cpus=cpus,
            torch_threads=torch.get_num_threads(),
            jax_devices=[str(d) for d in jax.devices()],
            jax=jax.__version__,
            equinox=equinox.__version__,
            torch=torch.__version__,
            timm=timm.__version__,
            numpy=np.__version__,
            cait_eqx=cait_eqx.__version__,
            typechecking=cait_eqx.TYPECHECKING_ENABLED,
            xla_flags=os.environ.get("XLA_FLAGS", ""),
            glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
            transparent_huge_pages=_thp_mode(),
            train_calls_per_round=args.train_calls,
            round_warmup_calls=args.round_warmup,
            rounds=args.rounds,
            quick=args.quick,
        ),
    )
    _log(f"measuring the matmul ceiling on {args.threads} threads ...")
    results["ceiling"] = ceiling = matmul_ceiling(512 if args.quick else 2048, 3 if args.quick else 5)
    _log(f"    ceiling {ceiling['max']:.1f} GFLOP/s")
    results["throughput"], results["parity"], results["compile"], results["memory"] = [], [], [], []
    for bench in configs:
        rows, parity, comp = run_throughput(bench, args, ceiling["max"])
        results["throughput"] += rows
        results["parity"].append(parity)
        results["compile"] += comp
    if "compile" in parts:
        structures = COMPILE_QUICK if args.quick else COMPILE_FULL
        results["compile"] = compile_times(structures, args.compile_rounds) + results["compile"]
    if "memory" in parts:
        for bench in configs or [BENCHES[k] for k in ("xxs24", "s24", "small")]:
            results["memory"] += run_memory(bench, args)
    for k in [k for k, v in results.items() if v == []]:
        del results[k]
    table = markdown(results)
    print(table, end="")
    if args.json:
        write_json_atomic(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
