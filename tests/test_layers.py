"""The house rules, checked on every import statement of qlora/ (inside functions too):

- dependencies point one way: a module imports only from its own layer or the layers below it
  (utilities -> arch/optim -> quant -> lora/levers -> modes -> plan/fsdp/export -> train -> cli);
- no import cycle between modules, at any depth;
- no private name (`_x`) is imported from another module.
"""
from __future__ import annotations

import ast
from pathlib import Path

QLORA = Path(__file__).resolve().parents[1] / "qlora"
LAYERS = {"errors": 0, "util": 0, "arch": 1, "optim": 1, "bundled": 1, "quant": 2, "lora": 3, "levers": 3,
          "modes": 4, "plan": 5, "fsdp": 5, "export": 5, "train": 6, "cli": 7}


def _module_name(path: Path) -> str:
    parts = path.relative_to(QLORA.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports():
    """(importing module, imported module, names) for every `import` / `from ... import` in qlora/."""
    for path in sorted(QLORA.rglob("*.py")):
        mod = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield mod, node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    yield mod, a.name, []


def _layer(module: str):
    parts = module.split(".")
    return LAYERS.get(parts[1]) if parts[0] == "qlora" and len(parts) > 1 else None


def test_dependencies_point_one_way():
    upward = [(src, dst) for src, dst, _ in _imports()
              if src != "qlora" and _layer(dst) is not None and _layer(src) is not None and _layer(dst) > _layer(src)]
    assert not upward, upward


def test_no_import_cycle_at_any_depth():
    modules = {_module_name(p) for p in QLORA.rglob("*.py")}
    graph: dict[str, set] = {}
    for src, dst, names in _imports():
        if src == "qlora" or not dst.startswith("qlora"):
            continue
        targets = {f"{dst}.{n}" for n in names if f"{dst}.{n}" in modules} or {dst}
        graph.setdefault(src, set()).update(t for t in targets if t in modules and t != src)
    # a package's __init__ re-exports its modules: an edge into the package is an edge into what it re-exports
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_private_names_cross_modules():
    private = [(src, dst, n) for src, dst, names in _imports() if dst.startswith(("qlora", "memprofile"))
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, private
