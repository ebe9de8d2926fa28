"""engine/ has no import cycles (function-level imports included) and never imports the UI."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def engine_imports() -> dict[str, set[str]]:
    """Module name -> the engine modules it imports anywhere in its file."""
    graph = {}
    for path in (ROOT / "engine").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:  # `from engine.store import registry` names the module registry
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if (ROOT / (full.replace(".", "/") + ".py")).exists() else node.module)
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names}
        graph[name] = {d for d in deps if d.split(".")[0] in ("engine", "app")}
    return graph


def test_engine_has_no_import_cycles_and_no_ui():
    graph = engine_imports()
    assert "engine.training.pipeline" in graph and "engine.selfstudy.llamacpp_backend" in graph
    assert not [(m, d) for m, deps in graph.items() for d in deps if d.startswith("app")]
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
