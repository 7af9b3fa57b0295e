"""Test configuration: explicit broadcasting only, 8 CPU devices, runtime type checking on, shared fixtures.

Fixtures: `getkey` (fresh PRNG keys), `tiny_config` (the keywords of the small CaiT most tests build) and
`tiny_model` (that CaiT, built once per session). JAX's compiled programs are released after a test module
once the process holds many memory mappings (`_release_compiled_programs`).
"""

import atexit
import importlib.metadata
import os
import shutil
import tempfile

from packaging.version import Version

# Runtime jaxtyping + beartype checks must be on in every test (the package reads this at import).
os.environ["CAIT_EQX_TYPECHECK"] = "1"

# One persistent compilation cache for the processes the tests start (the CLI runs of tests/test_faults.py
# and tests/test_cli.py, two-process runs, examples, benchmark scripts): each is a fresh process that would
# compile the same training step again; with the cache only the first does (tests/test_faults.py and
# tests/test_cli.py: 168 s without, 101 s with). Every program is stored (no minimum compile time), and a
# cached program is the same machine code, so no result changes. The cache is bounded, which makes JAX
# guard it with a file lock: processes that start together never read a half-written entry. This process
# stores only programs that took at least a second to compile: storing all of them cost more than it saved
# (tests/test_model.py, test_training.py and test_features.py: 212 s without the cache, 262 s storing all,
# 213 s storing those).
# A JAX_COMPILATION_CACHE_DIR set by the caller is used as it is. Only from JAX 0.10 (checked with 0.10.2):
# under JAX 0.5.3, the floor CI also tests, a training step crashed the process with the cache on
# (SIGSEGV in tests/test_training.py), so older JAX runs the tests without it.
_JAX_VERSION = Version(importlib.metadata.version("jax"))  # read without importing JAX (it reads the env)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and _JAX_VERSION >= Version("0.10"):
    _cache_dir = tempfile.mkdtemp(prefix="cait-eqx-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 * 2**30))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # this process only (see above)
jax.config.update("jax_numpy_rank_promotion", "raise")
# Strict dtype promotion breaks optax's own update rules, so it is checked for our model alone in
# tests/test_model.py::test_model_runs_under_strict_dtype_promotion rather than globally.

import gc  # noqa: E402
import itertools  # noqa: E402
from types import MappingProxyType  # noqa: E402

import pytest  # noqa: E402

import cait_eqx  # noqa: E402

assert cait_eqx.TYPECHECKING_ENABLED, "tests must run with jaxtyping + beartype checking on"


def _memory_mappings() -> int | None:
    """How many memory mappings this process holds, where Linux says (`/proc/self/maps`); else `None`."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


def _mapping_limit() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as limit:
            return int(limit.read())
    except (OSError, ValueError):
        return 65_530  # Linux's default


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after a test module once the process holds many memory mappings.

    Each XLA:CPU executable keeps its machine code in memory mappings of its own, and JAX's caches keep every
    executable alive. The whole suite in one process compiles thousands of programs (every test module
    builds its own models and steps, on up to 8 devices): never released, the process passed 37,000 mappings
    by tests/test_parallel.py and aborted in an XLA compilation in tests/test_training.py when it reached
    the kernel's limit (`vm.max_map_count`, 65,530), with no message. Releasing after every module cost
    recompiling what the next module shares (the op-by-op programs of eager calls, the common tiny models),
    so the caches go once a module leaves the process past a third of the limit — a margin of two thirds
    for the next module, which needs a few thousand — and after every module where the count is unknown.
    """
    yield
    mappings = _memory_mappings()
    if mappings is None or mappings > _mapping_limit() // 3:
        jax.clear_caches()
        gc.collect()


@pytest.fixture
def getkey():
    """Hands out fresh, distinct PRNG keys: `getkey()`."""
    counter = itertools.count()
    base = jax.random.key(1234)
    return lambda: jax.random.fold_in(base, next(counter))


# 16x16 RGB images in 4x4 patches (a 4x4 grid), 2 SA + 2 CA blocks, 4 heads of 8: every code path of the
# model, compiled in seconds. Read-only, so no test can change it for the others; derive with
# `dict(tiny_config, depth=3)`.
TINY_CONFIG = MappingProxyType(
    dict(image_size=16, patch_size=4, num_classes=10, dim=32, depth=2, cls_depth=2, heads=4, mlp_dim=64)
)


@pytest.fixture(scope="session")
def tiny_config():
    """The `CaiT` keywords of the small model most tests use (a read-only mapping)."""
    return TINY_CONFIG


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """`CaiT(**tiny_config, key=jax.random.key(0))`, built once (immutable, like every Equinox module)."""
    return cait_eqx.CaiT(**tiny_config, key=jax.random.key(0))
