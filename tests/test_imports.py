"""The house rules of `src/sara_moe`, read from the code's own imports (an AST walk, no import runs).

Every room has a floor number; a module may import modules on its own floor or below, never above,
and no chain of imports (top-level or inside functions) comes back to where it started. So the
method core never imports analysis, evaluation, reporting, the testbed or the experiment.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "sara_moe"

# floor of each room (first dotted part under sara_moe, or the top-level module's name)
FLOORS = {
    "divergence": 0,                                   # pure tensor math
    "runtime": 1, "data": 1,                           # files, options, loading, ranks; text in
    "architectures": 2,                                # the one place that knows families
    "routing": 3, "priors": 3, "train": 3,             # the method
    "analysis": 4, "steering": 4,
    "evaluation": 5,                                   # applies steering specs
    "reporting": 6,                                    # reads analysis and evaluation outputs
    "testbed": 7,                                      # research behind the boundary
    "experiment": 8,
    "cli": 9, "__init__": 9,                           # dispatch only
}
CORE = {"divergence", "runtime", "data", "architectures", "routing", "priors", "train"}
RESEARCH = {"analysis", "evaluation", "steering", "reporting", "testbed", "experiment"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def resolve(name: str, known: dict) -> str | None:
    """The longest known module that `name` (a dotted import target) names or lies in."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(mod: str, path: Path, known: dict) -> set[str]:
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {t for t in (resolve(x, known) for x in targets if x.startswith("sara_moe")) if t and t != mod}
    return found


def room(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {mod: imports_of(mod, path, modules()) for mod, path in modules().items()}


def test_every_room_has_a_floor_and_a_docstring():
    assert {room(m) for m in GRAPH} <= set(FLOORS), sorted({room(m) for m in GRAPH} - set(FLOORS))
    for pkg in [p for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()]:
        doc = ast.get_docstring(ast.parse((pkg / "__init__.py").read_text()))
        assert doc and "import" in doc, f"{pkg.name}/__init__.py: its docstring says what it is for and may import"


def test_the_top_level_shows_the_jobs_at_a_glance():
    entries = [p.name for p in PKG.iterdir() if p.name != "__pycache__" and not p.name.endswith(".egg-info")]
    assert len(entries) <= 15, sorted(entries)


def test_no_upward_import():
    upward = [f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets if FLOORS[room(b)] > FLOORS[room(a)]]
    assert not upward, upward
    core_to_research = [f"{a} -> {b}" for a, targets in GRAPH.items() if room(a) in CORE
                        for b in targets if room(b) in RESEARCH]
    assert not core_to_research, core_to_research


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(mod, path):
        state[mod] = 1
        for nxt in sorted(GRAPH[mod]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[mod] = 2

    for mod in sorted(GRAPH):
        if mod not in state:
            visit(mod, [mod])


def test_the_walk_sees_function_level_and_relative_imports(tmp_path):
    # the rule is only as good as the reader: an import inside a function and a relative one both count
    known = {"sara_moe": PKG / "__init__.py", "sara_moe.runtime": PKG, "sara_moe.runtime.artifacts": PKG,
             "sara_moe.experiment": PKG, "sara_moe.experiment.run": PKG}
    src = tmp_path / "artifacts.py"
    src.write_text("from . import options\n\ndef f():\n    from ..experiment.run import x\n    import sara_moe.runtime\n")
    found = imports_of("sara_moe.runtime.artifacts", src, known)
    assert found == {"sara_moe.experiment.run", "sara_moe.runtime"}
