"""The shape of the package, as the README's layout section states it: the SDK and the agent share a core
(``flightlog.proto``) and never import each other; no cycles between the three; importing the agent does not
load the tracker; no class or function past the size the README allows.

The import graph is read from the source (ast), through the same ``package-dir`` table setuptools uses, so
lazy imports inside functions count as much as the ones at the top of a module.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]

#: Over-size definitions the README's layout section names, with the reason there.
SIZE_EXCEPTIONS: dict[str, int] = {}
MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 80


def package_dirs() -> dict[str, Path]:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {pkg: ROOT / folder for pkg, folder in tool["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out: dict[str, Path] = {}
    for pkg, folder in package_dirs().items():
        for f in folder.glob("*.py"):
            name = pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"
            out[name] = f
    return out


def imports_of(name: str, path: Path) -> Iterator[str]:
    """Absolute names of the flightlog modules (or packages) that ``name`` imports, anywhere in the file."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            yield mod
            for alias in node.names:  # `from flightlog import capture` imports a module
                yield f"{mod}.{alias.name}"


def layer(module: str) -> str | None:
    if module == "flightlog" or module.startswith("flightlog."):
        if module.startswith("flightlog.proto"):
            return "core"
        if module.startswith("flightlog.agent"):
            return "agent"
        return "sdk"
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    assert "flightlog.agent.daemon" in mods and "flightlog.tracker" in mods and "flightlog.proto.ring" in mods
    return {
        name: {m for m in imports_of(name, path) if m in mods}
        for name, path in mods.items()
    }


def test_sdk_never_imports_the_agent(graph: dict[str, set[str]]) -> None:
    bad = sorted((m, d) for m, deps in graph.items() if layer(m) == "sdk" for d in deps if layer(d) == "agent")
    assert not bad, f"SDK modules import the agent: {bad}"


def test_agent_imports_only_the_core_and_itself(graph: dict[str, set[str]]) -> None:
    # Above all not the tracker, the config loader of the SDK or its client.
    bad = sorted((m, d) for m, deps in graph.items() if layer(m) == "agent" for d in deps if layer(d) == "sdk")
    assert not bad, f"agent modules import SDK modules: {bad}"


def test_core_imports_neither_side(graph: dict[str, set[str]]) -> None:
    bad = sorted((m, d) for m, deps in graph.items() if layer(m) == "core" for d in deps
                 if layer(d) in ("sdk", "agent"))
    assert not bad, f"core modules import the SDK or the agent: {bad}"


def test_no_cycles_between_the_layers(graph: dict[str, set[str]]) -> None:
    edges = {(layer(m), layer(d)) for m, deps in graph.items() for d in deps if layer(m) != layer(d)}
    assert not {(a, b) for a, b in edges if (b, a) in edges}, edges


def test_no_import_cycles_between_packages(graph: dict[str, set[str]]) -> None:
    """Packages (folders) form a DAG: flightlog.agent.sinks may use flightlog.agent.wal, not the other way too."""
    mods = modules()

    def package(m: str) -> str:
        return m if mods[m].stem == "__init__" else m.rpartition(".")[0]

    edges: dict[str, set[str]] = {}
    for m, deps in graph.items():
        for d in deps:
            a, b = package(m), package(d)
            # a subpackage using its parent package's modules is the normal direction; the parent's
            # __init__ re-exporting a child is not a cycle of modules either
            if a != b and not b.startswith(a + ".") and not a.startswith(b + "."):
                edges.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle between packages: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in list(edges):
        if node not in state:
            visit(node, [])


def test_importing_the_agent_does_not_load_the_tracker() -> None:
    code = ("import sys, flightlog.agent.daemon, flightlog.agent.cli; "
            "print(sorted(m for m in ('flightlog.tracker', 'flightlog.config', 'flightlog.client', "
            "'flightlog.capture', 'flightlog.ring', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_import_flightlog_is_light() -> None:
    code = ("import sys, flightlog; print(sorted(m for m in ('torch', 'wandb', 'mlflow', 'tensorboardX', "
            "'flightlog.tracker', 'flightlog.agent') if m in sys.modules)); "
            "flightlog.ExperimentTracker; print('flightlog.tracker' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True"], out


def _definitions() -> Iterator[tuple[str, str, int]]:
    for name, path in sorted(modules().items()):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                assert node.end_lineno is not None
                yield kind, f"{name}.{node.name}", node.end_lineno - node.lineno + 1


def test_no_class_or_function_past_its_size() -> None:
    too_big = [
        f"{kind} {qual}: {lines} lines"
        for kind, qual, lines in _definitions()
        if lines > SIZE_EXCEPTIONS.get(qual, MAX_CLASS_LINES if kind == "class" else MAX_FUNCTION_LINES)
    ]
    assert not too_big, "split these (or name them in the README's layout section): " + "; ".join(too_big)
