"""The shape of the code: layers as import contracts, small rooms, no private names across modules, one list
of hyper-parameters, a cheap `import cait_eqx`, and no process tricks."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
import pytest

import cait_eqx

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "cait_eqx"
MODULES = sorted(SRC.rglob("*.py"))
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_the_layer_contracts_hold():
    """`lint-imports` checks pyproject.toml's contracts (the layers of docs/architecture.md) on the real
    code."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BROKEN" not in done.stdout and f"{len(_contracts())} kept" in done.stdout, done.stdout


def test_the_contracts_cover_every_module():
    """Each module of the package sits in a layer of the contract, so no new room escapes the check."""
    layers = next(c for c in _contracts() if c["type"] == "layers")["layers"]
    named = {name.strip() for layer in layers for name in layer.replace(":", "|").split("|")}
    top = {_module_name(p).split(".")[1] for p in MODULES if _module_name(p) != "cait_eqx"}
    missing = sorted(f"cait_eqx.{t}" for t in top if f"cait_eqx.{t}" not in named)
    assert not missing, f"modules outside every layer of the import contract: {missing}"


def test_the_architecture_page_names_every_layer():
    page = (ROOT / "docs" / "architecture.md").read_text()
    layers = next(c for c in _contracts() if c["type"] == "layers")["layers"]
    for layer in layers:
        for name in layer.replace(":", "|").split("|"):
            short = name.strip().removeprefix("cait_eqx.")
            assert short in page, f"docs/architecture.md does not mention the layer module {short!r}"


def _private_imports(path: Path) -> list[str]:
    """`from <a cait_eqx module> import _name` lines: private names crossing a module boundary."""
    found = []
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        if module.split(".")[0] != "cait_eqx":
            continue
        for alias in node.names:
            if alias.name.startswith("_") and alias.name != "__version__":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {module} import {alias.name}")
    return found


def test_no_private_name_is_imported_across_modules():
    found = [line for path in MODULES for line in _private_imports(path)]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_the_private_import_check_bites(tmp_path):
    """The check above would catch `from ._model import _helper` (else it proves nothing)."""
    probe = SRC / "training" / "_probe_private_import.py"
    probe.write_text("from .._model import _remat_policy\nfrom ._steps import make_train_step\n")
    try:
        assert _private_imports(probe) == [
            "src/cait_eqx/training/_probe_private_import.py:1: from cait_eqx._model import _remat_policy"
        ]
    finally:
        probe.unlink()


def test_modules_are_small_rooms():
    """No module over ~400 lines unless its docstring says why it must be one room."""
    large = []
    for path in MODULES:
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "one room" not in doc:
            large.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not large, "modules over 400 lines without a reason in their docstring: " + ", ".join(large)


def test_the_library_never_replaces_the_users_process():
    """No `os.exec*`/`os.execve` in the package: a library is a guest in the user's process."""
    calls = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith(("exec", "spawnv", "posix_spawn")):
                if isinstance(node.value, ast.Name) and node.value.id == "os":
                    calls.append(f"{path.relative_to(ROOT)}:{node.lineno}: os.{node.attr}")
    assert not calls, calls
    assert not hasattr(cait_eqx, "restart_with_huge_pages")


def test_import_cait_eqx_does_not_import_jax():
    """Public names load on first use: `import cait_eqx` and the configs are pure Python (a fast CLI)."""
    code = (
        "import sys, cait_eqx, cait_eqx.data, cait_eqx.training\n"
        "cait_eqx.CaiTConfig(image_size=16, patch_size=4, num_classes=10, dim=32, depth=2, cls_depth=2,"
        " heads=4, mlp_dim=64)\n"
        "assert cait_eqx.data.NORMALIZATIONS\n"
        "cait_eqx.training.TrainConfig(epochs=2)\n"
        "print('jax' in sys.modules)\n"
        "cait_eqx.CaiT\n"
        "print('jax' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"], done.stdout


# ------------------------------------------------------------------------- one list of hyper-parameters

SEED_SIGNATURE = ["image_size", "patch_size", "num_classes", "dim", "depth", "cls_depth", "heads", "mlp_dim",
                  "dropout", "emb_dropout", "layer_dropout"]


def test_the_seed_constructor_is_kept_and_every_option_is_a_config_field():
    params = inspect.signature(cait_eqx.CaiT.__init__).parameters
    positional = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD and n != "self"]
    assert positional == SEED_SIGNATURE
    fields = [f.name for f in dataclasses.fields(cait_eqx.CaiTConfig)]
    assert set(SEED_SIGNATURE) <= set(fields)
    # Every other field is a keyword option, documented once, in CaiTConfig.
    helps = cait_eqx.CaiTConfig.field_help()
    assert list(helps) == fields and all(len(h) > 10 for h in helps.values())
    model = cait_eqx.CaiT(16, 4, 10, 32, 2, 2, 4, 64, 0.1, 0.0, 0.05, key=jax.random.key(0), dim_head=8,
                          channels=1, attn_dropout=0.1, init_values=0.5, talking_heads=False, qkv_bias=False,
                          cls_mlp_dim=48, dtype="float32")
    assert model.config == cait_eqx.CaiTConfig(
        image_size=(16, 16), patch_size=4, num_classes=10, dim=32, depth=2, cls_depth=2, heads=4, mlp_dim=64,
        dropout=0.1, layer_dropout=0.05, dim_head=8, channels=1, attn_dropout=0.1, init_values=0.5,
        talking_heads=False, qkv_bias=False, cls_mlp_dim=48,
    )
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['dimm'\].*fields of `CaiTConfig`"):
        cait_eqx.CaiT(16, 4, 10, 32, 2, 2, 4, 64, key=jax.random.key(0), dimm=3)


def test_the_config_resolves_once_and_round_trips():
    config = cait_eqx.CaiTConfig(image_size=16, patch_size=4, num_classes=10, dim=32, depth=20, cls_depth=2,
                                 heads=4, mlp_dim=64)
    assert (config.dim_head, config.cls_mlp_dim, config.init_values, config.dtype) == (8, 64, 1e-5, "float32")
    assert cait_eqx.CaiTConfig(**config.kwargs()) == config
    assert config.replace(image_size=(24, 32)).grid_size == (6, 8)
    with pytest.raises(ValueError, match=r"`image_size` \(16, 18\) is not divisible by `patch_size` 4"):
        config.replace(image_size=(16, 18))
