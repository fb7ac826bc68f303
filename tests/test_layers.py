"""The house rules, checked on every import statement of memprofile/, qlora/ and recipes/ (inside functions too):

- dependencies point one way: a module imports only from its own layer or the layers below it (LAYERS, bottom
  to top: memprofile -> qlora's subpackages -> the recipes), and every package of the tree has a layer;
- no import cycle between modules, at any depth;
- no private name (`_x`) is imported from another module;
- an import inside a function says why on its line (`# lazy: ...`): everything else is imported at the top;
- every package's docstring names each of its modules, and pyproject.toml ships every package.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = {"memprofile": ROOT / "memprofile", "qlora": ROOT / "qlora", "qlora_recipes": ROOT / "recipes"}
LAYERS = {
    "memprofile": 0,
    "qlora.errors": 1, "qlora.util": 1,
    "qlora.arch": 2, "qlora.optim": 2, "qlora.bundled": 2, "qlora.data": 2,
    "qlora.quant": 3,
    "qlora.lora": 4,
    "qlora.levers": 5, "qlora.objectives": 5,
    "qlora.plan": 6, "qlora.fsdp": 6, "qlora.export": 6,
    "qlora.train": 7,
    "qlora.cli": 8,
    "qlora_recipes": 9,
}


def _module_name(path: Path) -> str:
    for top, folder in TREES.items():
        if folder in path.parents:
            parts = (top, *path.relative_to(folder).with_suffix("").parts)
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(path)


def _files():
    return sorted(p for folder in TREES.values() for p in folder.rglob("*.py"))


def _imports():
    """(importing module, imported module, names, inside a function, the line) for every import statement."""
    for path in _files():
        mod, text = _module_name(path), path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            line = lines[node.lineno - 1] if hasattr(node, "lineno") else ""
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield mod, node.module, [a.name for a in node.names], id(node) in nested, f"{path}:{node.lineno}: {line}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    yield mod, a.name, [], id(node) in nested, f"{path}:{node.lineno}: {line}"


def _layer(module: str):
    """The layer of a module of the tree (None: not ours); the longest key of LAYERS that prefixes it."""
    keys = [k for k in LAYERS if module == k or module.startswith(k + ".")]
    return LAYERS[max(keys, key=len)] if keys else None


def test_every_package_has_a_layer():
    packages = {_module_name(p) for p in _files() if p.name == "__init__.py"} | {
        _module_name(p) for p in _files() if p.parent == TREES["qlora"] and p.name != "__init__.py"}
    missing = sorted(p for p in packages if p != "qlora" and _layer(p) is None)
    assert not missing, f"packages with no layer in tests/test_layers.py LAYERS: {missing}"


def test_dependencies_point_one_way():
    upward = [where for src, dst, _, _, where in _imports()
              if src != "qlora" and _layer(dst) is not None and _layer(src) is not None and _layer(dst) > _layer(src)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_cycle_at_any_depth():
    modules = {_module_name(p) for p in _files()}
    graph: dict[str, set] = {}
    for src, dst, names, _, _ in _imports():
        if src == "qlora" or _layer(dst) is None:
            continue
        targets = {f"{dst}.{n}" for n in names if f"{dst}.{n}" in modules} or {dst}
        graph.setdefault(src, set()).update(t for t in targets if t in modules and t != src)
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
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
    private = [where for _, dst, names, _, where in _imports() if _layer(dst) is not None
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_an_import_inside_a_function_says_why():
    unexplained = [where for _, _, _, inside, where in _imports() if inside and "#" not in where.split(": ", 1)[1]]
    assert not unexplained, ("imports inside functions with no reason on their line (hoist them, or say why: "
                             "`# lazy: ...`):\n" + "\n".join(unexplained))


def test_every_module_is_named_in_its_package_docstring():
    unnamed = []
    for init in (p for p in _files() if p.name == "__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        for module in sorted(init.parent.glob("*.py")):
            if module.name != "__init__.py" and not re.search(rf"\b{re.escape(module.stem)}(\.py)?\b", doc):
                unnamed.append(f"{init}: {module.name}")
    assert not unnamed, "modules missing from their package's docstring:\n" + "\n".join(unnamed)


def test_pyproject_ships_every_package():
    text = (ROOT / "pyproject.toml").read_text()
    shipped = set(re.findall(r'"([a-z_.]+)"', text.split("packages = [", 1)[1].split("]", 1)[0]))
    packages = {_module_name(p) for p in _files() if p.name == "__init__.py"}
    assert packages <= shipped, f"packages missing from pyproject.toml [tool.setuptools] packages: {packages - shipped}"
