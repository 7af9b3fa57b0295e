"""A batch through the model a few images at a time: `batched`, the chunked counterpart of `jax.vmap(model)`.

`jax.vmap(model)(images)` runs every block on the whole batch at once, so each block's widest intermediate
(the MLP's hidden activations, the attention maps) is as large as the batch makes it; once it outgrows the
CPU's caches every product and every elementwise pass reads it back from memory. `batched` runs the same
function on chunks of `auto_chunk(config)` images in a `lax.scan`: each chunk's intermediates stay in cache
from one block to the next. Same function, same numbers to float32 rounding; the measurements that chose the
budget are in benchmarks/README.md ("Chunked batches").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._config import CaiTConfig
from ._model import CaiT

__all__ = ["CHUNK_BUDGET_BYTES", "auto_chunk", "batched"]

# The widest intermediate of one chunk's block, in bytes, that `auto_chunk` keeps under: 8 MiB, half the L3
# slice of the machines measured (benchmarks/README.md, "Chunked batches").
CHUNK_BUDGET_BYTES = 8 * 2**20


def auto_chunk(config: CaiTConfig, budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    """Images per chunk for `batched`: the largest power of two whose widest block intermediate (an SA block's
    MLP hidden activations, `tokens × mlp_dim`, or its attention maps, `heads × tokens²`) fits `budget_bytes`.

    At least 1. `cait_s24_224` (197 tokens, MLP 1536, 8 heads): 4; `cait_xxs24_224`: 8; a 32×32 model with
    patch 4 and width 192: 32.
    """
    if budget_bytes < 1:
        raise ValueError(f"`budget_bytes` must be a positive number of bytes, got {budget_bytes}.")
    height, width = config.image_size
    tokens = (height // config.patch_size) * (width // config.patch_size) + 1
    itemsize = jnp.dtype(config.dtype or jnp.float32).itemsize
    widest = tokens * max(config.mlp_dim, config.heads * tokens) * itemsize
    chunk = 1
    while 2 * chunk * widest <= budget_bytes:
        chunk *= 2
    return chunk


# `chunk` is annotated wider than it may be, so a wrong one meets the sentence below, not a type-check error.
def _chunk_of(fn: Callable[..., Any], chunk: int | float | str | None) -> int | None:
    if chunk is None:
        return None
    if chunk == "auto":
        # Chunks keep a CPU's caches warm; an accelerator wants the whole batch in every kernel.
        owner = fn if isinstance(fn, CaiT) else getattr(fn, "__self__", None)
        on_cpu = jax.default_backend() == "cpu"
        return auto_chunk(owner.config) if isinstance(owner, CaiT) and on_cpu else None
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(
            f"`chunk` must be a whole number of images ≥ 1, 'auto' (a CaiT's own, "
            f"`auto_chunk(model.config)`) or None (the whole batch at once, as `jax.vmap`), got {chunk!r}."
        )
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
    share from every device. Keyed calls map their keys like any other argument
    (`batched(model)(images, key=jr.split(key, len(images)))`), so each example sees the same randomness
    as under `jax.vmap`.

    **Returns:** a function of the batched arguments, to call inside `jax.jit`/`eqx.filter_jit` (or eagerly).

    **Raises:** `ValueError` for a `chunk` that is not a whole number ≥ 1, `"auto"` or `None`, for a call
    without arrays, and for arguments whose leading axes differ.
    """
    size = _chunk_of(fn, chunk)

    def run(*args: Any, **kwargs: Any) -> Any:
        inputs = (args, kwargs)
        leaves = jax.tree_util.tree_leaves(inputs)
        if not leaves:
            raise ValueError(
                "`batched(fn)` needs at least one array argument to map over; it was called with none."
            )
        sizes = sorted({jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}, key=str)
        if len(sizes) != 1 or sizes[0] is None:
            raise ValueError(
                f"`batched(fn)` maps every argument along its leading axis, so each needs the same batch "
                f"size; the leading sizes given are {sizes} (None: a scalar). Pass one example per row of "
                f"each array, and bind fixed arguments with `functools.partial`."
            )
        batch = sizes[0]

        def one_chunk(chunk_inputs: Any) -> Any:
            chunk_args, chunk_kwargs = chunk_inputs
            return jax.vmap(lambda a, k: fn(*a, **k))(chunk_args, chunk_kwargs)

        if size is None or batch <= size:
            return one_chunk(inputs)
        count = -(-batch // size)
        per = -(-batch // count)
        fill = count * per - batch

        def split(x: Any) -> Any:
            if fill:
                x = jnp.concatenate([x, jnp.repeat(x[-1:], fill, axis=0)])
            return jnp.swapaxes(x.reshape(per, count, *x.shape[1:]), 0, 1)

        def join(y: Any) -> Any:
            return jnp.swapaxes(y, 0, 1).reshape(count * per, *y.shape[2:])[:batch]

        out = jax.lax.map(one_chunk, jax.tree_util.tree_map(split, inputs))
        return jax.tree_util.tree_map(join, out)

    return run
