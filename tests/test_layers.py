"""Imports run one way: cli -> runs (run directories, ensembles, tuning, reports) -> train ->
evaluate -> nn -> ops, with config, metrics, data/ and the small utilities at the bottom. Every
import counts, at module level or inside a function, and no modules import each other in a cycle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "xmlsparse"

# Lowest first; a module belongs to the longest prefix that names it.
LAYERS = [
    ["xmlsparse", "xmlsparse.errors", "xmlsparse.atomic", "xmlsparse.outputs", "xmlsparse.config",
     "xmlsparse.metrics", "xmlsparse.data"],
    ["xmlsparse.ops"],
    ["xmlsparse.nn"],
    ["xmlsparse.evaluate"],
    ["xmlsparse.train", "xmlsparse.parallel"],
    ["xmlsparse.runs", "xmlsparse.ensembles", "xmlsparse.tune", "xmlsparse.report"],
    ["xmlsparse.cli", "xmlsparse.__main__"],
]


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names[name] = path
    return names


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xmlsparse"):
            for alias in node.names:  # `from xmlsparse.data import storage` imports a module
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("xmlsparse"))
    return found


def _layer(name: str) -> int:
    matches = [(len(prefix), level) for level, prefixes in enumerate(LAYERS) for prefix in prefixes
               if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} is in no layer: add it to LAYERS"
    return max(matches)[1]


def _graph() -> dict[str, set[str]]:
    modules = _module_names()
    return {name: _imports(path, modules) for name, path in modules.items()}


def test_no_module_imports_a_higher_layer():
    upward = [f"{name} imports {target}" for name, targets in _graph().items() for target in sorted(targets)
              if _layer(target) > _layer(name)]
    assert upward == []


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each cycle met by a depth-first walk, as "a -> b -> a"."""
    cycles = []
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph.get(name, ())):
            if target == name or target not in graph:
                continue
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    # An import inside a function counts, and trainer sits above evaluate.
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from xmlsparse.train.trainer import start_run\n")
    assert _imports(source, _module_names()) == {"xmlsparse.train.trainer"}
    assert _layer("xmlsparse.train.trainer") > _layer("xmlsparse.evaluate")
