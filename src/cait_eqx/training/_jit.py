"""Compiling a function built per call (a `fit`'s steps) so that its compiled programs go with it.

`eqx.filter_jit` keeps every function it compiled, and so its XLA programs, for the rest of the process
(its compile cache is keyed on the function itself); `owned_filter_jit` follows `eqx.filter_jit`'s rules
without that, so a sweep of `fit` calls in one process stays flat (docs/guides/robustness.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

__all__ = ["owned_filter_jit"]


class _Static(eqx.Module):
    """The non-array part of a compiled function's output, carried through `jax.jit` as its structure
    (flattened, so that comparing two never calls a leaf's own `__eq__`)."""

    leaves: tuple[Any, ...] = eqx.field(static=True)
    treedef: Any = eqx.field(static=True)

    @property
    def value(self) -> Any:
        return jax.tree.unflatten(self.treedef, self.leaves)


def owned_filter_jit(fun: Callable[..., Any], *, donate: str = "none") -> Callable[..., Any]:
    """`eqx.filter_jit(fun, donate=donate)` for a function built per call (a closure), whose compiled programs
    live only as long as the returned function.

    `eqx.filter_jit` keeps a closure it compiled, and so its programs, for the rest of the process: it hands
    the function to `jax.jit` as a static argument, so JAX's caches hold it strongly, under a key that lives
    as long as the function does. Every `fit` builds new steps, and each compiled XLA:CPU program holds
    memory mappings of its own: a sweep of fits in one process ran into the kernel's limit on mappings
    (`vm.max_map_count`) and died in a compilation ("Cannot allocate memory"). Here `jax.jit` compiles a
    wrapper that closes over `fun`; the only static argument is the arguments' non-array part, so once the
    returned function is gone, its programs are freed. Arrays (JAX and NumPy) are traced, everything else is
    static and must be hashable, as with `eqx.filter_jit`; positional arguments only.

    **Arguments:**

    - `fun`: the function to compile.
    - `donate`: `"none"` or `"all-except-first"` (every array buffer but the first argument's is donated).
        (Keyword only argument.)

    **Returns:** `compiled(*args)`, which calls `fun(*args)` compiled once per structure of its arguments.
    """
    if donate not in ("none", "all-except-first"):
        raise ValueError(f"`donate` must be 'none' or 'all-except-first', got {donate!r}.")

    def flat(donated, kept, static):
        static_leaves, treedef = static
        # Each position holds its leaf in exactly one of the three (`None` is never a leaf).
        leaves = [
            next(x for x in choices if x is not None)
            for choices in zip(static_leaves, donated, kept, strict=True)
        ]
        dynamic_out, static_out = eqx.partition(fun(*jax.tree.unflatten(treedef, leaves)), eqx.is_array)
        static_leaves_out, static_treedef_out = jax.tree.flatten(static_out)
        return dynamic_out, _Static(tuple(static_leaves_out), static_treedef_out)

    jitted = jax.jit(flat, donate_argnums=0, static_argnums=2)

    def compiled(*args):
        leaves, treedef = jax.tree.flatten(args)
        # The first argument's leaves come first in the flattened tuple.
        first = len(jax.tree.leaves(args[:1])) if donate == "all-except-first" else len(leaves)
        arrays = [leaf if eqx.is_array(leaf) else None for leaf in leaves]
        donated = tuple(a if i >= first else None for i, a in enumerate(arrays))
        kept = tuple(a if i < first else None for i, a in enumerate(arrays))
        static_leaves = tuple(None if eqx.is_array(leaf) else leaf for leaf in leaves)
        with warnings.catch_warnings():
            # As `eqx.filter_jit` with `donate="all..."`: buffers that no output can reuse (the key, a uint8
            # batch) are donated all the same; XLA's note about them is noise.
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            dynamic_out, static_out = jitted(donated, kept, (static_leaves, treedef))
        return eqx.combine(dynamic_out, static_out.value)

    return compiled
