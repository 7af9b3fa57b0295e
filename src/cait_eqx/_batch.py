"""A batch through the model a few images at a time: `batched`, the chunked counterpart of `jax.vmap(model)`.

`jax.vmap(model)(images)` runs every block on the whole batch at once, so each block's widest intermediate
(the MLP's hidden activations, the attention maps) is as large as the batch makes it; once it outgrows the
CPU's caches every product and every elementwise pass reads it back from memory. `batched` runs the same
function on chunks of `auto_chunk(config)` images in a `lax.scan`: each chunk's intermediates stay in cache
from one block to the next. Same function, same numbers to float32 rounding; the measurements that chose the
budget are in benchmarks/README.md ("Chunked batches").

`chunked_value_and_grad` does the same for a training step: the loss and gradient of a batch, taken over
micro-batches of `auto_train_chunk(config)` images in turn inside one `lax.scan`, so the activations a
backward pass reads are one micro-batch's ("Chunked training steps" in benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ._config import CaiTConfig
from ._model import CaiT

__all__ = [
    "CHUNK_BUDGET_BYTES",
    "TRAIN_CHUNK_TOKENS",
    "auto_chunk",
    "auto_train_chunk",
    "batched",
    "chunked_value_and_grad",
]

# The widest intermediate of one chunk's block, in bytes, that `auto_chunk` keeps under: 8 MiB, half the L3
# slice of the machines measured (benchmarks/README.md, "Chunked batches").
CHUNK_BUDGET_BYTES = 8 * 2**20
# The fewest tokens (images × tokens an image) that one part of a training step's batch holds under
# `auto_train_chunk`: 768, where the measured steps were fastest (benchmarks/README.md, "Chunked training
# steps").
TRAIN_CHUNK_TOKENS = 768


def auto_chunk(config: CaiTConfig, budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    """Images per chunk for `batched`: the largest power of two whose widest block intermediate (an SA block's
    MLP hidden activations, `tokens × mlp_dim`, or its attention maps, `heads × tokens²`) fits `budget_bytes`.

    At least 1. `cait_s24_224` (197 tokens, MLP 1536, 8 heads): 4; `cait_xxs24_224`: 8; a 32×32 model with
    patch 4 and width 192: 32.
    """
    if budget_bytes < 1:
        raise ValueError(f"`budget_bytes` must be a positive number of bytes, got {budget_bytes}.")
    tokens = config.num_patches + 1
    itemsize = jnp.dtype(config.dtype or jnp.float32).itemsize
    widest = tokens * max(config.mlp_dim, config.heads * tokens) * itemsize
    chunk = 1
    while 2 * chunk * widest <= budget_bytes:
        chunk *= 2
    return chunk


def auto_train_chunk(config: CaiTConfig, min_tokens: int = TRAIN_CHUNK_TOKENS) -> int:
    """Images per forward and backward pass of a training step (`chunked_value_and_grad`, and
    `cait_eqx.training.make_train_step` on the CPU): the smallest power of two whose images hold at least
    `min_tokens` tokens together.

    A part that small keeps what its backward pass reads to a fraction of the whole batch's (the step's
    scratch memory, a fresh buffer every step: 758 MB for `cait_xxs24_224` at batch 16, 271 MB in parts of
    4); a smaller part would make every matrix product too thin to run at speed. `cait_xxs24_224` and
    `cait_s24_224` (197 tokens): 4; `cait_m36_384` (577): 2; a 32×32 model
    with patch 4 (65): 16.
    """
    if min_tokens < 1:
        raise ValueError(f"`min_tokens` must be a positive number of tokens, got {min_tokens}.")
    tokens = config.num_patches + 1
    chunk = 1
    while chunk * tokens < min_tokens:
        chunk *= 2
    return chunk


def micro_batch_count(size: int, chunk: int | None, multiple_of: int = 1) -> int:
    """How many equal micro-batches a batch of `size` runs as: the fewest, a multiple of `multiple_of`
    (which must divide `size`), of at most `chunk` images each. `None` → `multiple_of`. Where even the
    fewest-parts split leaves micro-batches under half of `chunk` (a batch of 97 and a chunk of 32 would run
    one image at a time), the batch runs as `multiple_of` micro-batches instead: slower passes of many tiny
    ones would lose more than the chunks win."""
    if multiple_of < 1 or size % multiple_of:
        raise ValueError(
            f"A batch of {size} does not split into {multiple_of} equal micro-batches: give a batch size "
            f"that is a multiple of {multiple_of}."
        )
    if chunk is None or size // multiple_of <= chunk:
        return multiple_of
    for count in range(multiple_of, size + 1, multiple_of):
        if size % count == 0 and size // count <= chunk:
            return count if 2 * (size // count) >= chunk else multiple_of
    return multiple_of


def value_and_grad_in_parts(
    grad_fn: Callable[..., Any], diff: Any, batch: tuple[Any, ...], count: int, has_aux: bool
) -> Any:
    """`grad_fn(diff, *batch)` (an `eqx.filter_value_and_grad` of a batch-mean loss) over `count` equal
    micro-batches in one `lax.scan`: the mean of their losses and gradients, which is the whole batch's.
    Micro-batch `k` holds the examples `k, k + count, …`, so a batch split over devices along its first axis
    stays where it is. With `has_aux` the micro-batches' aux arrays (one row per example) come back joined,
    in the batch's order."""
    if count == 1:
        return grad_fn(diff, *batch)
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    micro = size // count

    def join(y: Any) -> Any:
        if y.ndim < 2 or y.shape[1] != micro:
            raise ValueError(
                f"`chunked_value_and_grad(..., has_aux=True)` joins the micro-batches' aux arrays along "
                f"their leading axis, one row per example; one came back with shape {y.shape[1:]} for a "
                f"micro-batch of {micro}. Return per-example arrays as aux (logits, per-example losses) "
                f"and compute batch totals from them."
            )
        return _deinterleave(y)

    def wide(dtype: Any) -> Any:  # sums in at least float32, whatever the loss's or a parameter's dtype
        return jnp.promote_types(dtype, jnp.float32)

    loss_dtype: list[Any] = []  # the loss's own dtype, seen when the scan's body is traced

    def step(carry: Any, part: Any) -> Any:
        total, grad_sum = carry
        out, grads = grad_fn(diff, *part)
        value, aux = out if has_aux else (out, None)
        loss_dtype.append(value.dtype)
        grad_sum = jax.tree_util.tree_map(lambda s, g: s + g.astype(s.dtype), grad_sum, grads)
        return (total + value.astype(total.dtype), grad_sum), aux

    parts = jax.tree_util.tree_map(lambda x: _interleave(x, count), batch)
    params = eqx.filter(diff, eqx.is_inexact_array)
    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, wide(p.dtype)), params)
    # The loss is a scalar (a gradient needs one): summed in JAX's widest default float (float64 under x64).
    start = (jnp.zeros((), wide(jnp.result_type(float))), zeros)
    (total, grad_sum), aux = jax.lax.scan(step, start, parts)
    # Means over equal parts, back in the dtypes one pass over the whole batch gives.
    value = (total / count).astype(loss_dtype[0])
    grads = jax.tree_util.tree_map(lambda g, p: (g / count).astype(p.dtype), grad_sum, params)
    return ((value, jax.tree_util.tree_map(join, aux)) if has_aux else value), grads


def chunked_value_and_grad(
    loss_fn: Callable[..., Any], *, chunk: int | float | str | None = "auto", has_aux: bool = False
) -> Callable[..., Any]:
    """`eqx.filter_value_and_grad(loss_fn)` for a loss that is a mean over a batch, run `chunk` examples at a
    time: the batch is cut into equal micro-batches whose losses and gradients are taken one after the other
    in a `lax.scan` and averaged, which is the whole batch's loss and gradient to float32 rounding.

    ```python
    def loss_fn(model, images, labels):
        logits = jax.vmap(model)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @eqx.filter_jit
    def step(model, opt_state, images, labels):
        loss, grads = cait_eqx.chunked_value_and_grad(loss_fn)(model, images, labels)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss
    ```

    On the one CPU measured (an AMD EPYC Zen 4, AVX-512) this was 1.06–1.25× faster than one pass over the
    whole batch for the benchmark models (benchmarks/README.md, "Chunked training steps"; AVX2 CPUs are not
    measured), and it keeps one micro-batch's activations.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, *batch)`, a scalar that is the **mean** over the batch of a per-example
      loss (each example's term must not depend on the other examples: no batch statistics, no mixing
      inside it). Differentiated with respect to its first argument, as `eqx.filter_value_and_grad` does.
    - `chunk`: examples per micro-batch, at most. `"auto"` (the default): `auto_train_chunk(model.config)`
      when the first argument is a `CaiT`, JAX's default backend is the CPU and it has one device, else the
      whole batch at once (an accelerator's kernels want the whole batch); `None`: the whole batch at once.
      The batch runs as the fewest equal micro-batches of at most `chunk` examples; where the only such
      split leaves micro-batches under half of `chunk` (a batch of 97), it runs whole.
    - `has_aux`: `loss_fn` returns `(loss, aux)`; `aux` must hold per-example arrays (one row per example),
      which come back for the whole batch in its order.

    **Returns:** `run(model, *batch) -> (loss, grads)` (`((loss, aux), grads)` with `has_aux`), to call inside
    `jax.jit`/`eqx.filter_jit`; every array leaf of `batch` is cut along its leading axis.

    **Raises:** `ValueError` for a `chunk` that is not a whole number ≥ 1, `"auto"` or `None`, for a batch
    without arrays or whose arrays' leading axes differ, and for aux that is not per-example.
    """
    _check_chunk(
        chunk, "examples", "a CaiT's own, `auto_train_chunk(model.config)`, on one CPU device",
        "the whole batch at once",
    )
    grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=has_aux)

    def run(model: Any, *batch: Any) -> Any:
        size = _batch_size(batch, "chunked_value_and_grad(loss_fn)", "cuts every batch argument")
        part = auto_train_chunk_of(model) if chunk == "auto" else chunk
        return value_and_grad_in_parts(grad_fn, model, batch, micro_batch_count(size, part), has_aux)

    return run


def auto_train_chunk_of(model: Any) -> int | None:
    """`auto_train_chunk(model.config)` for a `CaiT` on a CPU backend of one device; else `None` (whole
    batches: an accelerator, a mesh of host devices, or a model whose configuration is not known)."""
    config = getattr(model, "config", None)
    if not isinstance(config, CaiTConfig) or jax.default_backend() != "cpu" or jax.device_count() != 1:
        return None
    return auto_train_chunk(config)


# `count` and `per` are ints, or symbolic dimensions when `jax.export` traces a batch of any size (hence not
# annotated `int`: the run-time type checks would refuse those).
def _interleave(x: Any, count, per=None) -> Any:
    """`(count · per, ...)` → `(count, per, ...)`, part `i` the rows `i, i + count, …`: a batch split over
    devices along its first axis stays where it is, every part taking its share from every device."""
    per = x.shape[0] // count if per is None else per
    return jnp.swapaxes(x.reshape(per, count, *x.shape[1:]), 0, 1)


def _deinterleave(y: Any) -> Any:
    """The inverse of `_interleave`: `(count, per, ...)` → `(count · per, ...)` in the batch's order."""
    return jnp.swapaxes(y, 0, 1).reshape(y.shape[0] * y.shape[1], *y.shape[2:])


def _check_chunk(chunk: Any, unit: str, auto: str, none: str) -> None:
    """A `ValueError` unless `chunk` is a whole number ≥ 1, `"auto"` or `None`."""
    whole = isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1
    if chunk != "auto" and chunk is not None and not whole:
        raise ValueError(
            f"`chunk` must be a whole number of {unit} ≥ 1, 'auto' ({auto}) or None ({none}), got {chunk!r}."
        )


def _batch_size(inputs: Any, who: str, does: str) -> Any:
    """The common leading size of every array leaf of `inputs` (an int; a symbolic dimension when
    `jax.export` traces a batch of any size), or a `ValueError` saying what differs."""
    leaves = jax.tree_util.tree_leaves(inputs)
    if not leaves:
        raise ValueError(f"`{who}` needs at least one array argument to map over; it was called with none.")
    sizes = sorted({jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}, key=str)
    if len(sizes) != 1 or sizes[0] is None:
        raise ValueError(
            f"`{who}` {does} along its leading axis, so each needs the same batch size; the leading sizes "
            f"given are {sizes} (None: a scalar). Pass one example per row of each array, and bind fixed "
            f"arguments with `functools.partial`."
        )
    return sizes[0]


# `chunk` is annotated wider than it may be, so a wrong one meets the sentence below, not a type-check error.
def _chunk_of(fn: Callable[..., Any], chunk: int | float | str | None) -> int | None:
    _check_chunk(
        chunk, "images", "a CaiT's own, `auto_chunk(model.config)`", "the whole batch at once, as `jax.vmap`"
    )
    if chunk is None:
        return None
    if chunk == "auto":
        # Chunks keep a CPU's caches warm; an accelerator wants the whole batch in every kernel.
        owner = fn if isinstance(fn, CaiT) else getattr(fn, "__self__", None)
        on_cpu = jax.default_backend() == "cpu"
        return auto_chunk(owner.config) if isinstance(owner, CaiT) and on_cpu else None
    return chunk


def batched(fn: Callable[..., Any], *, chunk: int | float | str | None = "auto") -> Callable[..., Any]:
    """`jax.vmap(fn)`, run `chunk` images at a time: every argument (positional and keyword, every array leaf)
    is mapped along its leading axis, and the results come back stacked along theirs, as with `jax.vmap`.

    ```python
    logits = eqx.filter_jit(lambda m, x: cait_eqx.batched(m)(x))(eqx.nn.inference_mode(model), images)
    ```

    **Arguments:**

    - `fn`: what one example goes through: a `CaiT`, one of its bound methods (`model.forward_features`), or
      any function `jax.vmap` can map.
    - `chunk`: images per chunk. `"auto"` (the default) takes `auto_chunk(model.config)` for a `CaiT` or its
      bound method when JAX's default backend is the CPU, and runs the whole batch at once on a GPU or TPU
      (whose kernels want the whole batch) and for any other function; `None` runs the whole batch at
      once; a number runs that many at a time, on any backend.

    A batch no larger than the chunk runs as one `jax.vmap`. A larger one is cut into the fewest chunks of
    at most `chunk` images, of equal size (a batch that does not divide repeats its last example to fill the
    last chunk; those results are dropped). Chunk `i` holds the examples `i, i + n, i + 2n, …` of the `n`
    chunks, so a batch split over devices along its first axis stays where it is: every chunk takes its
    share from every device. A batch of symbolic size (`jax.export` of any batch size, as `cait_eqx.export`
    writes) is always cut this way, since its size is known only when the program runs. Keyed calls map their
    keys like any other argument
    (`batched(model)(images, key=jr.split(key, len(images)))`), so each example sees the same randomness
    as under `jax.vmap`.

    **Returns:** a function of the batched arguments, to call inside `jax.jit`/`eqx.filter_jit` (or eagerly).

    **Raises:** `ValueError` for a `chunk` that is not a whole number ≥ 1, `"auto"` or `None`, for a call
    without arrays, and for arguments whose leading axes differ.
    """
    size = _chunk_of(fn, chunk)

    def run(*args: Any, **kwargs: Any) -> Any:
        inputs = (args, kwargs)
        batch = _batch_size(inputs, "batched(fn)", "maps every argument")

        def one_chunk(chunk_inputs: Any) -> Any:
            chunk_args, chunk_kwargs = chunk_inputs
            return jax.vmap(lambda a, k: fn(*a, **k))(chunk_args, chunk_kwargs)

        # A symbolic batch (`jax.export` with any batch size) is always cut: whether it fits one chunk is
        # known only when the artifact runs. The formulas hold for both: a batch of one is one chunk of one.
        symbolic = not isinstance(batch, int)
        if size is None or (not symbolic and batch <= size):
            return one_chunk(inputs)
        count = (batch + size - 1) // size
        per = (batch + count - 1) // count
        fill = count * per - batch

        def split(x: Any) -> Any:
            if symbolic or fill:
                x = jnp.concatenate([x, jnp.broadcast_to(x[-1:], (fill, *x.shape[1:]))])
            return _interleave(x, count, per)

        def join(y: Any) -> Any:
            return _deinterleave(y)[:batch]

        out = jax.lax.map(one_chunk, jax.tree_util.tree_map(split, inputs))
        return jax.tree_util.tree_map(join, out)

    return run
