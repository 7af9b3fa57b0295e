"""The documentation's API reference covers every public name, and every name it documents exists."""

import importlib
import inspect
import re
from pathlib import Path

import cait_eqx

ROOT = Path(__file__).resolve().parent.parent
API_DIR = ROOT / "docs" / "api"
# The public subpackages/modules whose names the reference must document, besides `cait_eqx` itself.
SUBMODULES = ("data", "training", "parallel", "viz")
_DIRECTIVE = re.compile(r"^:::\s+([\w.]+)\s*$", re.MULTILINE)


def _public_names(module) -> set[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in dir(module) if not n.startswith("_")]
    return {n for n in names if not inspect.ismodule(getattr(module, n))}


def _documented() -> set[str]:
    found = set()
    for page in API_DIR.glob("*.md"):
        found.update(_DIRECTIVE.findall(page.read_text()))
    return found


def test_every_public_name_has_an_api_entry():
    documented = _documented()
    expected = {f"cait_eqx.{n}" for n in _public_names(cait_eqx)}
    for sub in SUBMODULES:
        module = importlib.import_module(f"cait_eqx.{sub}")
        expected |= {f"cait_eqx.{sub}.{n}" for n in _public_names(module)}
    missing = sorted(expected - documented)
    assert not missing, f"public names without a `::: name` entry in docs/api/*.md: {missing}"


def test_every_api_entry_names_a_real_object():
    for path in sorted(_documented()):
        parts = path.split(".")
        for split in range(len(parts), 0, -1):  # the longest importable module prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:split]))
            except ModuleNotFoundError:
                continue
            for attr in parts[split:]:
                assert hasattr(obj, attr), f"docs/api documents {path}, but {attr!r} does not exist"
                obj = getattr(obj, attr)
            break


def test_every_public_function_and_class_has_a_docstring():
    # mkdocstrings renders the docstring: an undocumented name would be an empty entry.
    modules = [cait_eqx] + [importlib.import_module(f"cait_eqx.{s}") for s in SUBMODULES]
    empty = []
    for module in modules:
        for name in _public_names(module):
            obj = getattr(module, name)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not (obj.__doc__ or "").strip():
                empty.append(f"{module.__name__}.{name}")
    assert not empty, f"public names without a docstring: {sorted(empty)}"


def test_nav_lists_every_page_and_every_page_exists():
    config = (ROOT / "mkdocs.yml").read_text()
    nav = set(re.findall(r":\s+([\w/.-]+\.md)\s*$", config, re.MULTILINE))
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    pages = {p for p in pages if not p.startswith("assets/")}  # snippets included by pages (exclude_docs)
    assert nav <= pages, f"mkdocs.yml names missing pages: {sorted(nav - pages)}"
    assert pages <= nav, f"pages not reachable from the nav: {sorted(pages - nav)}"


def test_replication_page_shows_table_figure_and_command():
    page = (ROOT / "docs" / "replication.md").read_text()
    assert "python examples/replicate_layerscale.py" in page
    table = ROOT / "docs" / "assets" / "replication" / "table.md"
    assert table.is_file() and "| depth |" in table.read_text()
    assert "assets/replication/table.md" in page  # included by the snippets extension
    assert (ROOT / "docs" / "assets" / "replication" / "layerscale.png").is_file()
    assert "assets/replication/layerscale.png" in page


def test_cli_page_lists_exactly_the_real_flags():
    import argparse

    from cait_eqx.cli import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    page = (API_DIR / "cli.md").read_text()
    for name, sub in subparsers.choices.items():
        section = page.split(f"## `cait-eqx {name}`", 1)
        assert len(section) == 2, f"docs/api/cli.md has no section for `cait-eqx {name}`"
        text = section[1].split("\n## ", 1)[0]
        real = {s for a in sub._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
        real -= {s for s in real if s.startswith("--no-") and s[5:] and f"--{s[5:]}" in real}  # --[no-]flip
        listed = set(re.findall(r"`(--[a-z][a-z-]*)", text))
        assert listed == real, (
            f"cait-eqx {name}: undocumented {sorted(real - listed)}, stale {sorted(listed - real)}"
        )
