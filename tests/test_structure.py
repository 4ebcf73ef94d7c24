"""The package's shape, kept true by tests: imports form layers with no cycle, functions stay short.

Layers, bottom to top (docs/ARCHITECTURE.md draws them). A module may import modules of its own
layer or of a lower one — never of a higher one — and the import graph, counting imports inside
functions, has no cycle. Probes never import the trainer.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "pnnh"
MAX_LINES = 80
LONG_OK = "Long on purpose:"  # a docstring line that says why a function may be longer

#: (layer, module-name prefixes); the first matching prefix wins, most specific first.
LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (0, ("pnnh.errors", "pnnh.io", "pnnh.config", "pnnh.device", "pnnh.orthogonal",
         "pnnh.allocator")),
    (1, ("pnnh.data", "pnnh.fetch")),
    (2, ("pnnh.registry", "pnnh.layers", "pnnh.coder", "pnnh.models", "pnnh.norm_preservation",
         "pnnh.tat", "pnnh.export", "pnnh.convert", "pnnh.convert_blocks",
         "pnnh.convert_layouts", "pnnh.plainness", "pnnh.capture", "pnnh.checkpoint")),
    (3, ("pnnh.train", "pnnh.probes")),
    (4, ("pnnh.reproduce",)),
    (5, ("pnnh.report",)),
    (6, ("pnnh.demo",)),
    (7, ("pnnh.cli", "pnnh.__main__")),
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = ("pnnh",) + p.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the pnnh modules it imports anywhere (top level or inside functions).

    The package root ``pnnh`` (the public facade, imported lazily by nothing inside) is left out.
    """
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    head = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(head + ([node.module] if node.module else []))
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {d for d in deps if d in mods and d not in (name, "pnnh")}
    return graph


def layer_of(module: str) -> int:
    if module == "pnnh":  # the package's public facade sits on top of everything
        return len(LAYERS)
    for layer, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        colour[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if colour.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in colour and (cycle := visit(w)):
                return cycle
        stack.pop()
        colour[v] = 2
        return None

    for v in sorted(graph):
        if v not in colour and (cycle := visit(v)):
            return cycle
    return None


def test_every_module_has_a_layer():
    assert len(_modules()) > 20, f"no package found under {SRC}"
    for module in _modules():
        layer_of(module)


def test_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    wrong = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
             for a, deps in import_graph().items() for b in deps if layer_of(b) > layer_of(a)]
    assert not wrong, "\n".join(sorted(wrong))


def test_probes_do_not_import_training():
    graph = import_graph()
    wrong = [f"{a} -> {b}" for a, deps in graph.items() if a.startswith("pnnh.probes")
             for b in deps if b.startswith("pnnh.train")]
    assert not wrong, wrong


def test_the_checks_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def long_functions() -> list[str]:
    out = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES and LONG_OK not in (ast.get_docstring(node) or ""):
                    out.append(f"{path.relative_to(SRC.parent)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_over_80_lines_unless_it_says_why():
    assert not long_functions(), "\n".join(long_functions())


def test_the_registry_imports_no_model_family():
    """``pnnh.registry`` is the pure table; building by name (which needs every family) is
    ``pnnh.models``' job, as in timm."""
    graph = import_graph()
    reach, todo = set(), ["pnnh.registry"]
    while todo:
        for dep in graph[todo.pop()] - reach:
            reach.add(dep)
            todo.append(dep)
    assert not [m for m in reach if m.startswith("pnnh.models")], sorted(reach)

