"""Test configuration: explicit broadcasting only, 8 CPU devices, and runtime type checking switched on."""

import os

# Runtime jaxtyping + beartype checks must be on in every test (the package reads this at import).
os.environ["CAIT_EQX_TYPECHECK"] = "1"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
# Strict dtype promotion breaks optax's own update rules, so it is checked for our model alone in
# tests/test_model.py::test_model_runs_under_strict_dtype_promotion rather than globally.

import itertools  # noqa: E402

import pytest  # noqa: E402

import cait_eqx  # noqa: E402

assert cait_eqx.TYPECHECKING_ENABLED, "tests must run with jaxtyping + beartype checking on"


@pytest.fixture
def getkey():
    """Hands out fresh, distinct PRNG keys: `getkey()`."""
    counter = itertools.count()
    base = jax.random.key(1234)
    return lambda: jax.random.fold_in(base, next(counter))
