"""The layering rule of docs/architecture.md, read from every module's imports.

jaxsys is a stack of subpackages; a module may import from its own package's modules (without
cycles) and from packages lower in the stack, never from the same level's other packages or
from above. `pallas_kernels` imports no jaxsys at all. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Lowest first; packages on one line of the stack share a level and may not import each other.
LAYERS = [("config",), ("model", "data"), ("parallel",), ("checkpoint",), ("train",),
          ("inference",), ("tools",), ("cli",)]
LEVEL = {pkg: i for i, level in enumerate(LAYERS) for pkg in level}


def _modules() -> dict[str, Path]:
    mods = {}
    for top in ("jaxsys", "pallas_kernels"):
        for f in (ROOT / top).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of every jaxsys / pallas_kernels module that `name` imports."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in MODULES and t != name:
                out.add(t)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str | None:
    """The subpackage of jaxsys a module belongs to (None for jaxsys itself / its __main__)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "jaxsys" and len(parts) > 1 and parts[1] in LEVEL else None


def test_every_subpackage_has_a_level():
    subpackages = {p.name for p in (ROOT / "jaxsys").iterdir() if (p / "__init__.py").exists()}
    assert subpackages == set(LEVEL), "add the new subpackage to LAYERS and docs/architecture.md"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m)))
def test_imports_only_from_below(module):
    mine = _layer(module)
    for dep in sorted(GRAPH[module]):
        theirs = _layer(dep)
        if dep.startswith("pallas_kernels") or theirs == mine or dep == "jaxsys":
            continue
        assert theirs is not None and LEVEL[theirs] < LEVEL[mine], (
            f"{module} (layer {mine}) imports {dep} (layer {theirs}): a package imports only "
            f"from the layers below it: {LAYERS}")


def test_kernels_never_import_jaxsys():
    for module in (m for m in MODULES if m.startswith("pallas_kernels")):
        assert not any(d.startswith("jaxsys") for d in GRAPH[module]), module


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in GRAPH[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_an_upward_import(tmp_path):
    """The reader must catch an upward import written either way (absolute, relative)."""
    fake = tmp_path / "jaxsys" / "model"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from ..train import loop\nimport jaxsys.cli.main\n")
    MODULES["jaxsys.model.bad"] = fake / "bad.py"
    try:
        deps = _imports("jaxsys.model.bad", fake / "bad.py")
    finally:
        del MODULES["jaxsys.model.bad"]
    assert {"jaxsys.train.loop", "jaxsys.cli.main"} <= deps


def test_importing_jaxsys_and_the_cli_runtime_does_not_import_jax():
    import subprocess
    import sys
    code = ("import sys, jaxsys, jaxsys.config, jaxsys.parallel.runtime, jaxsys.cli.main; "
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
