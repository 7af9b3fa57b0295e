"""A frozen backbone that costs nothing: the training step of a full fine-tune against frozen ones.

Variants, each `cait_eqx.training.make_train_step` with the DeiT recipe (`make_optimizer`), batch 16:

- `none`: full fine-tuning, every parameter differentiated and optimised;
- `blocks:N`: the stem and the first N self-attention blocks frozen (`TrainConfig.freeze="blocks:N"`);
- `backbone`: a linear probe, only the head trains (`freeze="backbone"`);
- `lora:R`: LoRA adapters of rank R on every attention and MLP Linear (`cait_eqx.lora`, the default
    targets), the base weights frozen: the adapters and the head train;
- `masked`: the probe as before this change: every gradient computed, then routed to zero updates with
    `optax.multi_transform` (`make_optimizer(freeze="backbone")`), Adam state for the head only.

Every variant is compiled in one process with `eqx.filter_jit(...).lower(...).compile()`; XLA's account of
each compiled step gives its scratch memory (`temp_size_in_bytes`: activations kept for the backward pass
and every other temporary) and its arguments (the model, the optimiser state and the batch); the optimiser
state's size is counted from its arrays. Then `bench.interleaved` times them: one call each to warm up, one
to calibrate, `--rounds` rounds in alternating order, the medians over rounds reported. The matmul FLOPs of
each traced step (`bench.traced_matmul_flops`) say what the compiled program has to compute.

Run it under the machine's CPU lock, e.g.
`flock /tmp/cait_cpu.lock python benchmarks/freeze.py --json benchmarks/results/freeze.json`; the results
are in `docs/guides/finetune.md` ("A frozen backbone costs nothing"; the `lora:8` row under "LoRA
adapters", `benchmarks/results/freeze_lora.json`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402


def measure(args) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    import cait_eqx
    from cait_eqx import training

    if args.quick:
        model = cait_eqx.CaiT(**bench.BENCHES["tiny"].eqx_kwargs(), key=jr.key(0))
    else:
        model = cait_eqx.create_model(args.model, key=jr.key(0))
    depth, size = model.config.depth, model.config.image_size
    variants = [v.strip() for v in args.variants.replace("HALF", f"blocks:{depth // 2}").split(",")]
    images = jr.randint(jr.key(1), (args.batch, 3, *size), 0, 256).astype(jnp.uint8)
    labels = jnp.arange(args.batch, dtype=jnp.int32) % model.config.num_classes
    steps, out = {}, {}
    for variant in variants:
        lora_rank = int(variant.split(":")[1]) if variant.startswith("lora:") else 0
        trained = cait_eqx.lora(model, rank=lora_rank, key=jr.key(2)) if lora_rank else model
        freeze = "none" if variant == "masked" or lora_rank else variant
        optim = training.make_optimizer(1e-4, freeze="backbone" if variant == "masked" else "none")
        # Whole batches, as the results in docs/guides/finetune.md were measured (no automatic parts).
        config = training.StepConfig(
            num_classes=model.config.num_classes, freeze=freeze, step_chunk=args.batch
        )
        pure = training.make_train_step(optim, config, jit=False)
        masked = variant == "masked"
        params = eqx.filter(trained, eqx.is_array) if masked else training.trainable_params(trained, freeze)
        opt_state = optim.init(params)

        def step(batch_and_key, model, opt_state, pure=pure):
            batch, key = batch_and_key
            return pure(model, opt_state, batch, key)

        fresh = jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, trained)
        flops = bench.traced_matmul_flops(
            eqx.filter_make_jaxpr(step)(((images, labels), jr.key(0)), fresh, opt_state)[0].jaxpr
        )
        compiled = eqx.filter_jit(step, donate="all-except-first").lower(
            ((images, labels), jr.key(0)), fresh, opt_state
        ).compile()
        memory = compiled.compiled.memory_analysis()
        state = [fresh, opt_state]
        counter = [0]

        def call(compiled=compiled, state=state, counter=counter):
            counter[0] += 1
            state[0], state[1], metrics = compiled(((images, labels), jr.key(counter[0])), *state)
            jax.block_until_ready(metrics["loss"])

        steps[variant] = call
        out[variant] = dict(
            freeze=freeze,
            matmul_gflops=flops / 1e9,
            temp_mb=memory.temp_size_in_bytes / 2**20,
            argument_mb=memory.argument_size_in_bytes / 2**20,
            opt_state_mb=sum(x.nbytes for x in jax.tree.leaves(opt_state) if eqx.is_array(x)) / 2**20,
        )
        print(f"{variant}: compiled, {out[variant]['temp_mb']:.0f} MB scratch", file=sys.stderr)
    timings = bench.interleaved(steps, args.rounds, args.target_s, min_calls=1, round_warmup=1)
    for variant, timing in timings.items():
        out[variant].update(timing)
    return dict(variants=out, title=f"{model.config.depth}-block CaiT {size[0]}×{size[1]}"
                if args.quick else args.model)


def markdown(results: dict) -> str:
    meta = results["meta"]
    base = results["variants"].get("none")
    lines = [
        f"{meta['cpu']} ({meta['isa']}), {meta['threads']} threads; {meta['title']}, batch {meta['batch']}; "
        f"medians over {meta['rounds']} interleaved rounds.",
        "",
        "| freeze | s / step | × full step | matmul GFLOP / step | XLA scratch MB | optimiser state MB | "
        "XLA arguments MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, r in results["variants"].items():
        ratio = f"{r['median_s'] / base['median_s']:.2f}×" if base else "–"
        name = "backbone, masked (before: every gradient computed)" if variant == "masked" else variant
        lines.append(
            f"| {name} | {r['median_s']:.3f} | {ratio} | {r['matmul_gflops']:.2f} | {r['temp_mb']:.0f} | "
            f"{r['opt_state_mb']:.1f} | {r['argument_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cait_xxs24_224", help="a cait_eqx variant name (random weights)")
    p.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--variants", default="none,HALF,backbone,masked",
                   help="comma list of freeze settings (none, backbone, blocks:N; HALF: blocks:depth/2), "
                   "lora:R (adapters of rank R) and masked (the probe with every gradient computed)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--target-s", type=float, default=4.0, help="seconds of timed calls per round and variant")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (affinity), as in bench.py")
    p.add_argument("--quick", action="store_true", help="CI mode: the tiny model, one round")
    p.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    p.add_argument("--table", metavar="JSON", help="only print the table of an earlier --json file")
    args = p.parse_args(argv)
    if bench.answered_without_measuring(args, markdown):
        return 0
    if args.quick:
        args.rounds, args.target_s, args.batch = 1, 0.1, 4
    measured = measure(args)
    cpu, isa = bench.cpu_kind()
    results = dict(
        meta=dict(
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            cpu=cpu, isa=isa, machine=platform.machine(), threads=args.threads, rounds=args.rounds,
            batch=args.batch, title=measured["title"],
            command=" ".join([os.path.basename(sys.executable), *sys.argv]),
        ),
        variants=measured["variants"],
    )
    if args.json:
        bench.write_json_atomic(args.json, results)
    print(markdown(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
