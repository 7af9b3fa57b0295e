"""The benchmark script (`benchmarks/bench.py`) in its quick CI mode: it must run end to end, and its JSON and
markdown table must hold every measurement with sane values.

This is not a timed test: nothing here asserts that one library is faster. It catches a benchmark that
silently drops a contender or a row, compares different weights, counts FLOPs wrongly, or prints a table that
does not match its own JSON.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench.py"
sys.path.insert(0, str(SCRIPT.parent))

import bench  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Run `bench.py --quick --json PATH` once in a fresh process; give (stdout, parsed JSON, JSON path)."""
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=1"),
    )
    assert proc.returncode == 0, f"bench.py --quick failed:\n{proc.stderr[-4000:]}"
    return proc.stdout, json.loads(path.read_text()), path


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_every_throughput_row_is_present_and_sane(quick):
    _, results, _ = quick
    tiny = bench.BENCHES["tiny"]
    expected = {("inference", b, c) for b in tiny.infer_batches for c in ("cait_eqx", "timm")}
    expected |= {("train", tiny.train_batch, c) for c in ("cait_eqx", "timm")}
    rows = results["throughput"]
    got = {(r["workload"], r["batch"], r["contender"]) for r in rows}
    assert got == expected, f"missing {expected - got}, unexpected {got - expected}"
    for r in rows:
        assert _finite_positive(r["images_per_s"]), r
        # images/s is batch / median seconds per step, not some other statistic.
        assert r["images_per_s"] * r["median_step_s"] == pytest.approx(r["batch"], rel=1e-9)
        assert r["median_step_s"] in r["step_s"] or len(r["step_s"]) % 2 == 0
        # Above 2× the measured matmul ceiling the FLOP count or the ceiling would be wrong.
        assert 0 < r["fraction_of_ceiling"] < 2, r


@pytest.mark.slow
def test_ratios_are_finite_and_match_the_rows(quick):
    _, results, _ = quick
    ratios = bench.ratio_rows(results)
    assert len(ratios) == 3
    by_key = {(r["workload"], r["batch"], r["contender"]): r["images_per_s"] for r in results["throughput"]}
    for row in ratios:
        assert _finite_positive(row["ratio_vs_timm"]), row
        eqx_ips = by_key[(row["workload"], row["batch"], "cait_eqx")]
        timm_ips = by_key[(row["workload"], row["batch"], "timm")]
        assert row["ratio_vs_timm"] == pytest.approx(eqx_ips / timm_ips)
        assert row["ratio_vs_timm_compile"] is None  # no --compile in quick mode


@pytest.mark.slow
def test_flop_count_is_the_analytic_matmul_count(quick):
    import jax.random as jr

    import cait_eqx

    _, results, _ = quick
    tiny = bench.BENCHES["tiny"]
    cfg = cait_eqx.CaiT(**tiny.eqx_kwargs(), key=jr.key(0)).config
    fwd = bench.forward_flops(cfg) / 1e9
    for r in results["throughput"]:
        assert r["gflop_per_image"] == pytest.approx(fwd * (3 if r["workload"] == "train" else 1))


@pytest.mark.slow
def test_parity_compile_and_memory_sections(quick):
    _, results, _ = quick
    (parity,) = results["parity"]
    assert parity["max_rel_diff"] <= bench.PARITY_TOLERANCE
    compile_rows = {(c["structure"], c["workload"]): c for c in results["compile"]}
    assert set(compile_rows) == {(s, w) for s in ("tiny", "tiny_deep") for w in ("forward", "train")}
    for c in compile_rows.values():
        assert _finite_positive(c["trace_s"]) and _finite_positive(c["compile_s"]), c
        assert c["total_s"] == pytest.approx(c["trace_s"] + c["compile_s"])
    memory = {m["contender"]: m for m in results["memory"]}
    assert set(memory) == {"cait_eqx", "timm"}
    for m in memory.values():
        assert m["rss_setup_mb"] > 50, m  # a Python process with jax or torch loaded is never this small
        assert m["warmup_peak_mb"] >= m["rss_setup_mb"] * 0.99, m
        if m["steady_state_peaks"]:
            for w in ("infer", "train"):
                assert m[f"{w}_peak_mb"] >= m[f"{w}_base_mb"] > 0, m


@pytest.mark.slow
def test_printed_table_is_the_json_rendered(quick):
    stdout, results, path = quick
    assert stdout == bench.markdown(results)
    for row in bench.ratio_rows(results):
        line = next(
            (ln for ln in stdout.splitlines() if f"| {row['workload']} | {row['batch']} |" in ln), None
        )
        assert line is not None, f"no table line for {row['workload']} batch {row['batch']}"
        assert f"{row['ratio_vs_timm']:.2f}×" in line
    # `--table` re-renders saved results without measuring anything.
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--table", str(path)], capture_output=True, text=True, timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == stdout


@pytest.mark.parametrize(
    "overrides",
    [{}, {"talking_heads": False, "cls_depth": 1}, {"dim_head": 24, "patch_size": 4}, {"heads": 16}],
)
def test_flop_formula_matches_the_traced_program(overrides):
    """`forward_flops` (the formula behind every FLOP/s figure) equals the matmul FLOPs of the traced forward.

    The talking-heads mixes are products in the traced program only above `UNROLL_HEAD_MIX` heads (16 here);
    with fewer they are written out as scaled sums and the formula's `head_mix_flops` is added. A formula that
    forgot a product, counted the scan's body once, or used `dim` where the attention width `heads · dim_head`
    belongs would differ.
    """
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    import cait_eqx
    from cait_eqx._layers import UNROLL_HEAD_MIX

    kwargs = {**bench.BENCHES["tiny"].eqx_kwargs(), **overrides}
    model = cait_eqx.CaiT(**kwargs, key=jr.key(0))
    cfg = model.config
    image = jnp.zeros((cfg.channels, *cfg.image_size))
    traced = bench.traced_matmul_flops(jax.make_jaxpr(model)(image).jaxpr)
    unseen = cfg.depth * bench.head_mix_flops(cfg) if cfg.heads <= UNROLL_HEAD_MIX else 0
    assert (cfg.heads > UNROLL_HEAD_MIX) == (overrides.get("heads") == 16)
    assert traced + unseen == bench.forward_flops(cfg) > 0


@pytest.mark.slow
def test_train_step_variants_quick_mode_prints_every_variant():
    """`train_step_variants.py --quick` (the A/B script behind the README's talking-heads figures) runs end to
    end and prints one sane row per variant, the current code being its own 1.00× reference."""
    script = ROOT / "benchmarks" / "train_step_variants.py"
    proc = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"Machine: {bench.cpu_kind()[0]} ({bench.cpu_kind()[1]}); XLA_FLAGS=")
    rows = [line.split("|")[1:-1] for line in lines[4:]]
    import train_step_variants

    assert [cells[2].strip() for cells in rows] == list(train_step_variants.VARIANTS)
    for cells in rows:
        seconds, images_per_s = float(cells[3]), float(cells[4])
        assert seconds > 0 and images_per_s > 0
    assert rows[0][5].strip() == "1.00×"


def test_each_variant_traces_differently_and_is_undone():
    """`train_step_variants.traced_as(v)` must change what the model traces to (else a variant row would time
    the current code under another name), and leave the package as it was on exit."""
    import jax
    import jax.numpy as jnp
    import train_step_variants

    import cait_eqx

    model = cait_eqx.CaiT(**bench.BENCHES["tiny"].eqx_kwargs(), key=jax.random.key(0))
    image = jnp.ones((3, model.config.image_size[0], model.config.image_size[1]))

    import equinox as eqx

    params, static = eqx.partition(model, eqx.is_inexact_array)

    def program():
        return str(jax.make_jaxpr(jax.grad(lambda p: eqx.combine(p, static)(image).sum()))(params))

    current = program()
    for variant in ("head-mix product", "erfc GELU", "indexed qkv", "heads-major attention"):
        with train_step_variants.traced_as(variant):
            assert program() != current, variant
        assert program() == current, f"{variant} was not undone"


@pytest.mark.slow
def test_quick_run_records_its_allocator_settings(quick):
    """Both contenders run under the same glibc tunables, and the JSON says which: by default glibc's own
    setting (`--huge-pages off`), even when the caller's environment asked for huge pages."""
    stdout, results, _ = quick
    meta = results["meta"]
    # The caller asked for huge pages; `--huge-pages off` (the default) restarted the process without them.
    assert meta["glibc_tunables"] == "glibc.malloc.hugetlb=0"
    assert meta["train_calls_per_round"] == 3
    assert meta["round_warmup_calls"] == 1
    # The machine's vector extension, which the ratios depend on, is recorded and named in the printed table.
    assert meta["isa"] == bench.cpu_kind()[1] and meta["isa"] in ("AVX-512", "AVX2", "neither")
    assert f"({meta['isa']})" in stdout
    # Every row keeps the untimed first call of each of its rounds, so what the median leaves out is on
    # record.
    for r in results["throughput"]:
        assert len(r["round_warmup_s"]) == len(r["step_s"]) == meta["rounds"]
        assert all(_finite_positive(t) for t in r["round_warmup_s"]), r
        assert r["round_warmup_calls"] == 1 and r["timed_calls_per_round"] >= (
            3 if r["workload"] == "train" else 1
        )
    # ... and the table shows the ratio as it would be had those calls been timed too.
    for row in bench.ratio_rows(results):
        eqx, timm = (next(r for r in results["throughput"] if (r["workload"], r["batch"], r["contender"]) ==
                          (row["workload"], row["batch"], c)) for c in ("cait_eqx", "timm"))

        def counting_warmup(r):
            n = r["timed_calls_per_round"]
            means = sorted(
                (w + n * t) / (1 + n) for w, t in zip(r["round_warmup_s"], r["step_s"], strict=True)
            )
            return r["batch"] / means[len(means) // 2]  # one round in quick mode: its mean

        assert row["ratio_vs_timm_counting_warmup"] == pytest.approx(
            counting_warmup(eqx) / counting_warmup(timm)
        )
        line = next(ln for ln in stdout.splitlines() if f"| {row['workload']} | {row['batch']} |" in ln)
        assert line.split("|")[7].strip() == f"{row['ratio_vs_timm_counting_warmup']:.2f}×"
    assert "… counting each round's first call" in stdout
    rendered = bench.markdown({"meta": {**meta, "glibc_tunables": "glibc.malloc.hugetlb=1"}})
    assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (both contenders)" in rendered.splitlines()[0]


def test_huge_pages_setting_is_enforced_both_ways(tmp_path):
    """`--huge-pages off` in an environment that asks for huge pages runs the measurement in a child process
    started without them (and the other way round), never by re-executing itself: the setting the JSON reports
    is the one the process that measured ran under, and the parent exits with the child's status."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(SCRIPT.parent)!r})\n"
        "import bench\n"
        "print('pid', os.getpid(), flush=True)\n"
        "bench.ensure_huge_pages(sys.argv[1] == 'on')\n"
        "print(os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), flush=True)\n"
        "sys.exit(int(sys.argv[2]))\n"
    )
    for setting, start, expected in [
        ("off", "x.y=2:glibc.malloc.hugetlb=1", "x.y=2:glibc.malloc.hugetlb=0"),
        ("on", "", "glibc.malloc.hugetlb=1"),
        ("on", "glibc.malloc.hugetlb=1", "glibc.malloc.hugetlb=1"),
    ]:
        env = dict(os.environ, GLIBC_TUNABLES=start)
        proc = subprocess.run([sys.executable, str(probe), setting, "3"], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 3, proc.stderr  # the child's status, passed on
        *starts, last = proc.stdout.strip().splitlines()
        pid, _, tunables = last.partition(" ")
        assert tunables == expected, (setting, start, proc.stdout)
        # The work is done once, under the wanted setting: by this process where it had it already, else by
        # one child process (another process id: nothing was re-executed in place).
        if start == expected:
            assert starts == [f"pid {pid}"], proc.stdout
        else:
            assert len(starts) == 2 and starts[1] == f"pid {pid}" and starts[0] != starts[1], proc.stdout


def test_interleaved_leaves_each_rounds_warmup_calls_out_of_the_timing(monkeypatch):
    """Each contender's round is its warm-up call(s) then its timed calls, back to back; a call that is slow
    only because it opens a round shows in `round_warmup_s`, not in the timed seconds. A fake clock makes it
    exact: every call takes 1 s, except the first of each round (after warm-up and calibration), which takes
    100 s."""
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    log, calls = [], {}

    def opens_slow(name, per_round):
        calls[name] = 0

        def fn():
            i = calls[name]
            calls[name] += 1
            log.append(name)
            clock[0] += 100.0 if i >= 2 and (i - 2) % per_round == 0 else 1.0

        return fn

    fns = {"a": opens_slow("a", 4), "b": opens_slow("b", 4)}
    out = bench.interleaved(fns, rounds=3, target_s=0.0, min_calls=3, round_warmup=1)
    # Warm-up, calibration, then rounds in alternating order, each contender's calls back to back.
    assert log == ["a", "b", "a", "b"] + ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4 + ["a"] * 4 + ["b"] * 4
    for name in ("a", "b"):
        assert out[name]["round_warmup_s"] == [100.0] * 3
        assert out[name]["seconds"] == [1.0] * 3 and out[name]["median_s"] == 1.0
        assert out[name]["timed_calls_per_round"] == 3 and out[name]["first_call_s"] == 1.0
    # Without warm-up calls the same slow opening call is timed: (100 + 1 + 1) / 3 per call.
    out = bench.interleaved({"c": opens_slow("c", 3)}, rounds=2, target_s=0.0, min_calls=3)
    assert out["c"]["round_warmup_s"] == [] and out["c"]["seconds"] == [pytest.approx(34.0)] * 2


def _tables(stdout):
    """The markdown tables of a script's output, each as a list of rows of cells (header and rule dropped)."""
    tables, current = [], None
    for line in stdout.splitlines():
        if line.startswith("| "):
            if current is None:
                current = []
                tables.append(current)
            current.append([c.strip() for c in line.split("|")[1:-1]])
        elif not line.startswith("|---"):
            current = None
    return [t[1:] for t in tables]


@pytest.mark.slow
def test_huge_pages_script_quick_mode(tmp_path):
    """`huge_pages.py --quick` (behind the README's huge-page figures) runs a worker process per setting and
    prints one sane row each, `off` being the 1.00× reference; with `--idle` it also times the step after each
    pause, in a second table and in the JSON."""
    script = ROOT / "benchmarks" / "huge_pages.py"
    path = tmp_path / "hp.json"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--idle", "0,0.2", "--json", str(path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps, idle = _tables(proc.stdout)
    assert [cells[2] for cells in steps] == ["0", "1"]
    for cells in steps:
        seconds, images_per_s = float(cells[3]), float(cells[4])
        assert seconds > 0 and images_per_s == pytest.approx(int(cells[1]) / seconds, rel=0.01)
        float(cells[5]), float(cells[6])  # faults and kernel seconds are numbers
    off, on = (float(cells[3]) for cells in steps)
    assert steps[1][7] == f"{off / on:.2f}×"
    assert [(cells[2], cells[3]) for cells in idle] == [("0", "0"), ("0", "0.2"), ("1", "0"), ("1", "0.2")]
    assert all(float(cells[4]) > 0 and float(cells[5]) >= 0 for cells in idle)
    results = json.loads(path.read_text())
    assert results["meta"]["idle_s"] == [0.0, 0.2]
    for run in results["runs"]:
        assert [a["pause_s"] for a in run["after_idle"]] == [0.0, 0.2] and all(
            a["step_s"] > 0 for a in run["after_idle"]
        )


def test_huge_pages_script_rejects_a_bad_idle_list():
    script = ROOT / "benchmarks" / "huge_pages.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--idle", "1,two"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "--idle: expected comma-separated seconds" in proc.stderr


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """One JAX compilation cache for the quick runs below, so that only their first worker compiles the
    model's set-up (each worker is a fresh process)."""
    return tmp_path_factory.mktemp("jax-cache")


@pytest.mark.slow
def test_remat_script_quick_mode(tmp_path, jax_cache):
    """`remat.py --quick` (behind the README's rematerialisation table) runs one fresh worker per policy, and
    the policy reaches the compiled program: XLA's scratch memory for a step that keeps nothing for the
    backward pass (`full`) is smaller than for one that keeps everything (`none`)."""
    import remat

    import cait_eqx

    assert remat.POLICIES == tuple(cait_eqx.REMAT_POLICIES)
    script = ROOT / "benchmarks" / "remat.py"
    path = tmp_path / "remat.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--jax-cache", str(jax_cache), "--json", str(path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (table,) = _tables(proc.stdout)
    assert [cells[2] for cells in table] == list(remat.POLICIES)
    assert table[0][4] == "1.00×"
    for cells in table:
        assert float(cells[3]) > 0 and float(cells[5]) > 0 and float(cells[8]) > 0
    runs = {r["policy"]: r for r in json.loads(path.read_text())["runs"]}
    assert set(runs) == set(remat.POLICIES)
    assert runs["full"]["temp_mb"] < runs["none"]["temp_mb"], {p: r["temp_mb"] for p, r in runs.items()}
    for r in runs.values():
        # No allocator set-up in the worker: the glibc tunables it started with are recorded instead.
        assert "allocator" not in r and r["glibc_tunables"] == os.environ.get("GLIBC_TUNABLES", "")
        assert len(r["step_times_s"]) == 2
    proc = subprocess.run([sys.executable, str(script), "--table", str(path)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and _tables(proc.stdout) == [table], proc.stderr


_SPAWNS_A_WORKER = """
import multiprocessing
import time

import numpy as np


def worker():
    block = np.ones(100 * 2**20 // 8)  # 100 MB touched
    time.sleep(1.0)


if __name__ == "__main__":
    block = np.ones(250 * 2**20 // 8)  # 250 MB touched, before the worker starts
    process = multiprocessing.get_context("spawn").Process(target=worker)
    process.start()
    process.join()
"""


_WATCHES = """
import json, sys
import numpy as np
import data_pipeline
block = np.ones(int(sys.argv[1]) * 2**20 // 8)  # the watcher's own resident set, before it starts the trainer
print(json.dumps(data_pipeline.watch_training([sys.executable, sys.argv[2]], sys.argv[3], 0.05)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("watcher_mb", [0, 600])
def test_data_pipeline_watcher_gives_each_process_its_own_peak(tmp_path, watcher_mb):
    """`data_pipeline.watch_training` (behind the README's peak-memory table) reads each process's own peak:
    a spawned worker's is its own 100 MB, not the 250 MB of the process that started it (which
    `getrusage` would report for it), and the trainer's is its own ~280 MB, not the watcher's 600 MB,
    which Linux carries into the trainer's `wait4` figure: that figure is used only where it is the
    trainer's (a small watcher), and then agrees with the sampled one."""
    (tmp_path / "spawns_a_worker.py").write_text(_SPAWNS_A_WORKER)
    (tmp_path / "watches.py").write_text(_WATCHES)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "watches.py"), str(watcher_mb), str(tmp_path / "spawns_a_worker.py"),
         str(tmp_path / "log.txt")],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(SCRIPT.parent)),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    memory = json.loads(proc.stdout)
    assert memory["watcher_peak_mb"] > watcher_mb, memory
    assert 250 < memory["trainer_peak_mb"] < 400, memory
    assert memory["trainer_peak_from"] == ("samples" if watcher_mb else "wait4"), memory
    assert memory["trainer_sampled_peak_mb"] == pytest.approx(memory["trainer_peak_mb"], rel=0.05), memory
    (worker,) = memory["worker_peaks_mb"]
    assert 100 < worker < 200, memory
    assert memory["peak_sum_rss_mb"] > memory["trainer_peak_mb"] + 100 * 0.9, memory
    assert 0 < memory["peak_sum_pss_mb"] <= memory["peak_sum_rss_mb"], memory


@pytest.mark.slow
def test_data_pipeline_script_quick_mode(tmp_path):
    """`data_pipeline.py --quick --only digits` (behind the README's throughput table) measures every source
    with every worker count, and its table is its JSON rendered: the ratios are the measured images/s over
    the step's, which is the timed steps' images over their time."""
    script = ROOT / "benchmarks" / "data_pipeline.py"
    path = tmp_path / "data_pipeline.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--only", "digits", "--cache", str(tmp_path / "cache"),
         "--json", str(path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(path.read_text())
    generated, throughput = _tables(proc.stdout)
    assert [cells[4] for cells in generated] == ["generated"]
    measured = results["throughput"]
    assert [t["source"] for t in measured] == ["mnist-png-256 (PNG files)"]  # --quick: the files only
    rows = iter(throughput)
    for t in measured:
        step = t["step"]
        assert step["images_per_s"] == pytest.approx(step["timed_steps"] * t["batch"] / step["timed_s"])
        assert [r["workers"] for r in t["rows"]] == [0, 1]
        for r in t["rows"]:
            cells = next(rows)
            assert cells[0] == t["source"] and int(cells[3]) == r["workers"]
            assert r["pipeline_images_per_s"] > 0 and r["fit_images_per_s"] > 0
            assert cells[7] == f"{r['pipeline_images_per_s'] / step['images_per_s']:.2f}×"
            assert cells[9] == f"{r['fit_images_per_s'] / step['images_per_s']:.2f}×"
    assert next(rows, None) is None
    proc = subprocess.run([sys.executable, str(script), "--table", str(path)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and _tables(proc.stdout) == [generated, throughput], proc.stderr


@pytest.mark.slow
def test_data_pipeline_times_fit_between_stamps_one_step_late():
    """The fit column's premise, on `fit` itself: `on_step(k)` for a step `data_pipeline._read_late` returns
    comes once `fit` has called step k + 1 (its stamp is the end of step k + 1), and for every other step (a
    log, an epoch's end, the last step) before that call. A window with one end of each kind counts one step
    too many or too few (it did: `fit` measured 1.18× the step alone)."""
    import itertools

    import data_pipeline
    import jax.random as jr
    import numpy as np

    import cait_eqx
    from cait_eqx import data, parallel, training

    train = data.load_digits().subset(np.arange(160))
    config = training.TrainConfig(epochs=3, batch_size=32, log_every=3, data_workers=0)
    mesh = parallel.make_mesh(data=1)
    events: list[tuple[str, int]] = []
    calls = itertools.count(1)

    def compile_logged(pure):
        step = parallel.shard_train_step(pure, mesh)

        def logged(*args):
            events.append(("call", next(calls)))
            return step(*args)

        return logged

    steps = training.TrainSteps.build(config, 5, 10, mesh, compile_step=compile_logged)
    model = cait_eqx.CaiT(image_size=8, patch_size=4, num_classes=10, dim=16, depth=1, cls_depth=1, heads=2,
                          mlp_dim=32, channels=1, key=jr.key(0))
    last = 12
    training.fit(model, train, None, config, key=jr.key(1), max_steps=last, progress=False,
                 handle_signals=False, steps=steps, on_step=lambda k, _: events.append(("metrics", k)))
    late = {k for k in range(1, last) if data_pipeline._read_late(k, config, steps.steps_per_epoch) == k}
    assert late == {1, 2, 4, 7, 8, 11}  # not 3, 6, 9 (logs), 5, 10 (epochs' ends) or 12 (the last)
    for k in range(1, last + 1):
        metrics, next_call = events.index(("metrics", k)), events.index(("call", k + 1)) if k < last else None
        if k in late:
            assert next_call is not None and next_call < metrics, (k, events)
        else:
            assert next_call is None or metrics < next_call, (k, events)


# ------------------------------------------------------------------------------------ benchmarks/gpu.py

GPU_SCRIPT = ROOT / "benchmarks" / "gpu.py"

import gpu  # noqa: E402


def _run_gpu(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, str(GPU_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


@pytest.fixture(scope="module")
def gpu_smoke(tmp_path_factory):
    """`gpu.py --smoke --json PATH` once, in a fresh process: (stdout, parsed JSON, JSON path)."""
    path = tmp_path_factory.mktemp("gpu") / "smoke.json"
    proc = _run_gpu("--smoke", "--json", str(path))
    assert proc.returncode == 0, f"gpu.py --smoke failed:\n{proc.stderr[-4000:]}"
    return proc.stdout, json.loads(path.read_text()), path


@pytest.mark.slow
def test_gpu_smoke_measures_every_row(gpu_smoke):
    """Every model × dtype × workload × (cait_eqx, timm eager) is measured, none dropped or duplicated, with
    images/s that is batch over the timed seconds per call, and cait_eqx's XLA memory counted."""
    _, results, _ = gpu_smoke
    rows = results["rows"]
    contenders = ("cait_eqx", "timm")
    expected = {
        (m, d, w, c) for m in gpu.MODELS for d in gpu.DTYPES for w in gpu.WORKLOADS for c in contenders
    }
    got = [(r["model"], r["dtype"], r["workload"], r["contender"]) for r in rows]
    assert sorted(got) == sorted(expected), f"missing {expected - set(got)}"
    assert results["not_measured"] == []
    for r in rows:
        assert r["status"] == "ok", r
        assert r["batch"] == gpu.SMOKE_BATCH and r["timed_calls"] == 1
        assert _finite_positive(r["images_per_s"]) and _finite_positive(r["first_call_s"]), r
        assert r["images_per_s"] * r["step_s"] == pytest.approx(r["batch"], rel=1e-9)
    peak = {
        (r["model"], r["dtype"], r["workload"]): r["peak_bytes"] for r in rows if r["contender"] == "cait_eqx"
    }
    for (model, dtype, workload), value in peak.items():
        assert isinstance(value, int) and value > 0
        if workload == "train":  # gradients and AdamW's moments on top of the weights
            assert value > peak[(model, dtype, "inference")]
    meta = results["meta"]
    assert meta["smoke"] and meta["contenders"] == ["cait_eqx", "timm"]
    assert meta["jax_device_kind"] and meta["torch_device"] == "cpu" and meta["timm"]
    assert "--smoke" in meta["command"] and "xla_flags" in meta


@pytest.mark.slow
def test_gpu_smoke_ratios_are_the_rows_ratios(gpu_smoke):
    _, results, _ = gpu_smoke
    rows = results["rows"]
    ips = {(r["model"], r["dtype"], r["workload"], r["contender"]): r["images_per_s"] for r in rows}
    ratios = results["ratios"]
    assert len(ratios) == len(gpu.MODELS) * len(gpu.DTYPES) * len(gpu.WORKLOADS)
    for q in ratios:
        key = (q["model"], q["dtype"], q["workload"])
        assert q["vs_timm"] == pytest.approx(ips[(*key, "cait_eqx")] / ips[(*key, "timm")])
        assert q["vs_timm_compile"] is None  # no torch.compile rows in the smoke run


@pytest.mark.slow
def test_gpu_table_reprints_the_json(gpu_smoke):
    printed, results, path = gpu_smoke
    proc = _run_gpu("--table", str(path), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == printed == gpu.table(results)
    assert sum(line.startswith("| cait_") for line in printed.splitlines()) == len(results["rows"])


def test_gpu_rows_say_timm_not_installed(tmp_path):
    """On a machine without timm the torch worker reports its rows as such instead of crashing."""
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "__init__.py").write_text("raise ModuleNotFoundError('no timm here', name='timm')\n")
    spec = dict(lib="timm", model="cait_xxs24_224", batch=2, dtypes=list(gpu.DTYPES), smoke=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = _run_gpu("--worker", json.dumps(spec), env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line[len(gpu.MARK) :])["row"] for line in proc.stdout.splitlines()]
    assert [(r["dtype"], r["workload"]) for r in rows] == [(d, w) for d in gpu.DTYPES for w in gpu.WORKLOADS]
    assert {r["status"] for r in rows} == {"timm not installed (timm missing)"}


def test_gpu_spent_budget_skips_every_row_and_says_so(tmp_path):
    """With no budget left no worker starts; every planned row is in the JSON as skipped, with no ratios."""
    path = tmp_path / "none.json"
    proc = _run_gpu("--smoke", "--smoke-compile", "--budget-s", "0", "--json", str(path), timeout=60)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(path.read_text())
    assert len(results["rows"]) == len(gpu.MODELS) * len(gpu.DTYPES) * len(gpu.WORKLOADS) * 3
    assert {r["status"] for r in results["rows"]} == {"skipped: budget spent"}
    assert results["ratios"] == [] and len(results["not_measured"]) == len(results["rows"])


# --------------------------------------------------------------------- profile_step.py and step_settings.py


def test_the_profile_sorts_each_op_of_a_compiled_program_by_what_it_does():
    """`profile_step.parse_hlo`/`kind_of` on a real compiled program: a product is a product (with its
    FLOPs), a sum a reduction; an op XLA added has no op_name; the update phase is what lies outside the
    forward and backward passes."""
    import jax
    import jax.numpy as jnp
    import profile_step

    def f(a, b, c):
        return a @ b, jnp.sum(jnp.tanh(c), axis=0)

    a, b, c = jnp.ones((64, 32)), jnp.ones((32, 48)), jnp.ones((40, 24))
    instrs = profile_step.parse_hlo(jax.jit(f).lower(a, b, c).compile().as_text())
    kinds = {}
    for entry in (e for e in instrs.values() if e["runs"]):
        kind = profile_step.kind_of({**entry, "op_name": "jvp(" + entry["op_name"]})
        if kind is not None:
            kinds.setdefault(kind, []).append(entry)
    products = kinds["matrix products"]
    assert sum(e["total_flops"] for e in products) == 2 * 64 * 32 * 48
    assert "reductions" in kinds
    assert profile_step.phase_of({"op_name": ""}) == "inserted"
    assert profile_step.phase_of({"op_name": "jit(step)/transpose(jvp(vmap()))/dot_general"}) == "backward"
    assert profile_step.phase_of({"op_name": "jit(step)/jvp(vmap())/dot_general"}) == "forward"
    assert profile_step.phase_of({"op_name": "jit(step)/mul"}) == "update"
    assert profile_step.kind_of({"opcode": "while", "opcodes": {"while"}, "op_name": "jvp(x)"}) is None


@pytest.mark.slow
def test_profile_step_quick_mode_accounts_for_the_step(tmp_path):
    """`profile_step.py --quick`: each workload's kinds add up to its total, the products' FLOPs are the
    traced program's matmul FLOPs (forward) and about three times them (training step), and the table is the
    JSON's."""
    import jax
    import jax.numpy as jnp

    import cait_eqx

    path = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--quick", "--json",
                           str(path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(path.read_text())
    assert results["meta"]["isa"] == bench.cpu_kind()[1] and "xla_flags" in results["meta"]
    rows = {r["workload"]: r for r in results["profiles"]}
    assert set(rows) == {"train", "inference"}
    for row in rows.values():
        kinds = row["kinds"]
        assert math.isclose(sum(k["ms"] for k in kinds.values()), row["total_ms"], rel_tol=1e-9)
        assert math.isclose(sum(k["share"] for k in kinds.values()), 1.0, rel_tol=1e-9)
        assert kinds["matrix products"]["ms"] > 0 and kinds["matrix products"]["gflops"] > 0
    b = bench.BENCHES["tiny"]
    model = cait_eqx.CaiT(**b.eqx_kwargs(), key=jax.random.key(0))
    x = jnp.ones((rows["inference"]["batch"], 3, b.image_size, b.image_size))
    traced = bench.traced_matmul_flops(jax.make_jaxpr(jax.vmap(model))(x).jaxpr)
    assert rows["inference"]["kinds"]["matrix products"]["flops"] == traced
    per_image = traced / rows["inference"]["batch"]
    train_flops = rows["train"]["kinds"]["matrix products"]["flops"] / rows["train"]["batch"]
    # The backward pass has two products per forward product, less the patch embedding's input gradient.
    assert 2.5 * per_image < train_flops <= 3 * per_image
    assert proc.stdout == subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--table", str(path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT).stdout


@pytest.mark.slow
def test_step_settings_quick_mode_runs_each_setting_in_its_own_process(tmp_path):
    """`step_settings.py --quick`: one row per setting, the first its own 1.00× reference; settings that do
    not change the maths (unrolling the scan, the batch split over two host devices) give the same loss to
    float32 rounding."""
    path = tmp_path / "settings.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_settings.py"), "--quick", "--json",
                           str(path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(path.read_text())
    rows = results["rows"]
    assert [r["name"] for r in rows] == ["default", "unroll 2", "two devices"]
    assert rows[0]["x_first"] == 1.0 and all(r["step_s"] > 0 and r["compile_s"] > 0 for r in rows)
    assert all(math.isclose(rows[0]["loss"], r["loss"], rel_tol=1e-5) for r in rows[1:])
    assert [r["devices"] for r in rows] == [1, 1, 2]  # the batch really was split over two devices
    assert results["meta"]["isa"] == bench.cpu_kind()[1]
    assert all(f"| {name} |" in proc.stdout for name in ("default", "unroll 2", "two devices"))

@pytest.mark.slow
def test_grad_accum_script_quick_mode(tmp_path, jax_cache):
    """`grad_accum.py --quick` (behind the fine-tuning guide's accumulation table) runs every variant in its
    own worker, and accumulation reaches the compiled program: 4 micro-batches of 2 need less scratch memory
    than the batch of 8 at once."""
    script = ROOT / "benchmarks" / "grad_accum.py"
    path = tmp_path / "grad_accum.json"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(jax_cache))
    proc = subprocess.run([sys.executable, str(script), "--quick", "--batch", "8", "--json", str(path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (table,) = _tables(proc.stdout)
    assert len(table) == 4 and all(float(cells[2]) > 0 for cells in table)
    runs = {r["variant"]: r for r in json.loads(path.read_text())["runs"]}
    assert runs["scan"]["temp_mb"] < runs["batch"]["temp_mb"]
    proc = subprocess.run([sys.executable, str(script), "--table", str(path)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and _tables(proc.stdout) == [table], proc.stderr


@pytest.mark.slow
def test_freeze_script_quick_mode(tmp_path, jax_cache):
    """`freeze.py --quick` (behind the fine-tuning guide's frozen-backbone table): a probe's traced step
    computes fewer matmul FLOPs than the masked probe, which computes every gradient."""
    script = ROOT / "benchmarks" / "freeze.py"
    path = tmp_path / "freeze.json"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(jax_cache))
    proc = subprocess.run([sys.executable, str(script), "--quick", "--json", str(path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (table,) = _tables(proc.stdout)
    assert [cells[0] for cells in table][:3] == ["none", "blocks:1", "backbone"] and table[0][2] == "1.00×"
    variants = json.loads(path.read_text())["variants"]
    assert variants["backbone"]["matmul_gflops"] < variants["masked"]["matmul_gflops"]
    assert variants["backbone"]["opt_state_mb"] < variants["none"]["opt_state_mb"]
    proc = subprocess.run([sys.executable, str(script), "--table", str(path)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and _tables(proc.stdout) == [table], proc.stderr


@pytest.mark.slow
def test_finetune_methods_script_quick_mode(tmp_path, jax_cache):
    """`finetune_methods.py --quick` (behind the fine-tuning guide's methods table): one fresh worker per
    method, and each method reaches the compiled step: the probe and `blocks:N` train fewer parameters and
    keep smaller optimiser states than the full fine-tune, accumulation needs less scratch than the full
    step, and every method trains the same loss at step 0 (same weights, same batch) to float32 rounding."""
    script = ROOT / "benchmarks" / "finetune_methods.py"
    path = tmp_path / "methods.json"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(jax_cache))
    methods = "full,remat:full,accum:2,probe,HALF"
    cmd = [sys.executable, str(script), "--quick", "--batch", "8", "--methods", methods, "--json", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (table,) = _tables(proc.stdout)
    rows = {r["method"]: r for r in json.loads(path.read_text())["methods"]}
    assert list(rows) == ["full", "remat:full", "accum:2", "probe", "blocks:1"] and len(table) == 5
    full = rows["full"]
    for name in ("probe", "blocks:1"):
        assert rows[name]["trainable_params"] < full["trainable_params"] == full["total_params"]
        assert rows[name]["opt_state_mb"] < full["opt_state_mb"]
    for name in ("remat:full", "accum:2"):
        assert rows[name]["trainable_params"] == full["trainable_params"]
    assert rows["accum:2"]["temp_mb"] < full["temp_mb"]
    for row in rows.values():
        assert math.isclose(row["first_loss"], full["first_loss"], rel_tol=1e-5), row["method"]
        assert row["step_s"] > 0 and row["peak_first_step_mb"] > 0
    proc = subprocess.run([sys.executable, str(script), "--table", str(path)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and _tables(proc.stdout) == [table], proc.stderr


def test_finetune_methods_rejects_an_unknown_method():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "finetune_methods.py"), "--quick",
                           "--methods", "full,lora"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode != 0 and "unknown method 'lora'" in proc.stderr and "lora:R" in proc.stderr


@pytest.mark.slow
def test_export_speed_quick_mode_times_both_artifacts(tmp_path):
    """`export_speed.py --quick` (the figures of the exported artifact in chunks) runs end to end: both
    artifacts timed, the chunked one really in chunks (8 images in chunks of 3), the same logits."""
    script = ROOT / "benchmarks" / "export_speed.py"
    path = tmp_path / "export.json"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--json", str(path)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(path.read_text())
    assert results["meta"]["cpu"] == bench.cpu_kind()[0] and results["meta"]["isa"] == bench.cpu_kind()[1]
    (row,) = results["rows"]
    assert (row["key"], row["batch"], row["chunk"]) == ("tiny", 8, 3)
    assert row["chunks_s"] > 0 and row["whole_s"] > 0
    assert row["max_rel_logit_diff"] < 1e-5
    assert "| 8 | 3 × ≤3 |" in proc.stdout


@pytest.mark.slow
def test_timm_under_torch_compile_is_compiled_for_every_shape():
    """`--compile` times timm under torch.compile for many shapes of one model in one process. torch.compile
    stops compiling a function after `recompile_limit` shapes and runs it eagerly with only a warning, so
    without care every later row of the "timm torch.compile" column would be eager timm. Here the limit is
    2 and the runner compiles 4 shapes (3 inference batches and a training step): each must compile afresh,
    and a fallback to eager must be an error, not a silent row."""
    import timm
    import torch

    model = timm.create_model(
        "cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
        num_classes=10,
    ).eval()
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=False):
        runner = bench.TorchRunner(model, compiled=True)
        for batch in (1, 2, 3):
            x = torch.randn(batch, 3, 32, 32)
            call = runner.inference(x)
            with torch.inference_mode():
                expected = model(x)
            torch.testing.assert_close(call(), expected, rtol=1e-4, atol=1e-5)
        step = runner.train(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
        assert torch.isfinite(step()) and torch.isfinite(step())
        # The runner's own guard: the same model compiled once for several shapes hits the limit loudly.
        torch._dynamo.reset()
        plain = torch.compile(model, dynamic=False)
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit), torch.inference_mode():
            for batch in (1, 2, 3):
                plain(torch.randn(batch, 3, 32, 32))
    torch._dynamo.reset()
