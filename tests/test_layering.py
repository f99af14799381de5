"""The package's module graph: no import cycle, and the layering of docs/ARCHITECTURE.md.

Only module-level imports count (``import x`` / ``from x import y`` at the top level of a module,
or inside a top-level ``if``/``try``); imports inside functions are deliberate lazy loads.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "xmodal"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _top_level_imports(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    out: set[str] = set()
    nodes = list(tree.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, (ast.If, ast.Try)):
            nodes.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            for h in getattr(node, "handlers", []):
                nodes.extend(h.body)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m == "xmodal" or m.startswith("xmodal.")}


def _graph() -> dict[str, set[str]]:
    files = sorted(SRC.rglob("*.py"))
    modules = {_module_name(p): p for p in files}
    graph = {}
    for mod, path in modules.items():
        deps = _top_level_imports(ast.parse(path.read_text()), mod, path.name == "__init__.py")
        graph[mod] = {d for d in deps if d in modules and d != mod}
    return graph


def _cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle_between_modules():
    graph = _graph()
    assert len(graph) > 40
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


@pytest.mark.parametrize("lower, upper", [
    ("xmodal.data", ("xmodal.train", "xmodal.eval", "xmodal.api", "xmodal.cli", "xmodal.demo")),
    ("xmodal.models", ("xmodal.train", "xmodal.eval", "xmodal.api", "xmodal.cli", "xmodal.demo")),
])
def test_lower_layers_do_not_import_upper_ones(lower, upper):
    bad = {(m, d) for m, deps in _graph().items() if m.startswith(lower) for d in deps if d.startswith(upper)}
    assert not bad, sorted(bad)


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


MAX_LINES, MAX_PARAMS = 80, 10


def _oversized(tree: ast.Module) -> list[tuple[str, int, int]]:
    """``(name, lines, parameters)`` of every function of ``tree`` over the limits (``self`` and
    ``cls`` not counted)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, [a.vararg, a.kwarg])]
            n = len([p for p in params if p.arg not in ("self", "cls")])
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_LINES or n > MAX_PARAMS:
                out.append((node.name, lines, n))
    return out


def test_no_function_over_80_lines_or_10_parameters():
    bad = {str(p.relative_to(SRC)): o for p in sorted(SRC.rglob("*.py")) if (o := _oversized(ast.parse(p.read_text())))}
    assert not bad, bad


def test_size_check_finds_a_long_function_and_a_wide_one():
    long_fn = "def f():\n" + "    x = 1\n" * MAX_LINES
    wide_fn = f"def g(self, {', '.join(f'a{i}' for i in range(MAX_PARAMS))}, *, b): pass\n"
    assert _oversized(ast.parse(long_fn + wide_fn)) == [("f", MAX_LINES + 1, 0), ("g", 1, MAX_PARAMS + 1)]
    assert _oversized(ast.parse("def h(self, a, b):\n    return a\n")) == []
