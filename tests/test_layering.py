"""Layering of the package, read from the source with `ast` (nothing is imported).

bench/ and eval/ sit on top of the runtime: the runtime never imports them, at module level or inside a
function, so the engine, the server and the offline tools load and work without either. The offline
quantizers sit on top of the engine the same way. And the module-level imports form no cycle, so every
module can be imported first.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nimblelm"
TOP_LAYERS = ("nimblelm.bench", "nimblelm.eval")
# The command line wires the bench and eval subcommands: the one runtime module allowed above them.
ENTRY_POINTS = {"nimblelm.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str) -> list[tuple[str, int, bool]]:
    """(nimblelm module imported, line, whether the import runs when `name` is imported) for every import
    statement of module `name`. An import inside a function or under `if TYPE_CHECKING:` does not run then."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def target(module: str) -> str | None:
        """The nimblelm module that importing `module` loads last: the deepest one that is a file here."""
        while module and module not in MODULES:
            module = module.rpartition(".")[0]
        return module or None

    def visit(node: ast.AST, at_import: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((m, node.lineno, at_import) for a in node.names if (m := target(a.name)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` loads the submodule pkg.sub when there is one, else an attribute of pkg.
            found.extend((m, node.lineno, at_import) for a in node.names if (m := target(f"{base}.{a.name}")))
        for child in ast.iter_child_nodes(node):
            inner = at_import and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(node, ast.If) and is_type_checking(node.test) and child in node.body:
                inner = False
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def in_layer(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def test_runtime_modules_never_import_bench_or_eval():
    offences = []
    for name, path in MODULES.items():
        if name in ENTRY_POINTS or any(in_layer(name, layer) for layer in TOP_LAYERS):
            continue
        for module, line, _ in imports(name):
            if any(in_layer(module, layer) for layer in TOP_LAYERS):
                offences.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert not offences, "runtime modules import the layers above them:\n" + "\n".join(dict.fromkeys(offences))


def module_graph() -> dict[str, list[tuple[str, int]]]:
    """Module name -> [(nimblelm module it imports at module level, line), ...]."""
    return {name: [(m, line) for m, line, at_import in imports(name) if at_import and m != name] for name in MODULES}


def find_cycle(graph: dict[str, list[tuple[str, int]]]) -> list[tuple[str, int]] | None:
    """A cycle as [(module, line of its import of the next one), ...] (the last imports the first), or None."""
    done: set[str] = set()
    path: list[tuple[str, int]] = []  # the modules being visited, each with the line of the edge taken

    def visit(name: str) -> list[tuple[str, int]] | None:
        for module, line in graph.get(name, []):
            path.append((name, line))
            on_path = [m for m, _ in path]
            if module in on_path:
                return path[on_path.index(module):]
            if module not in done and (cycle := visit(module)):
                return cycle
            path.pop()
        done.add(name)
        return None

    for name in graph:
        if name not in done and (cycle := visit(name)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_cycle_and_passes_a_diamond():
    diamond = {"a": [("b", 1), ("c", 2)], "b": [("d", 3)], "c": [("d", 4)], "d": []}
    assert find_cycle(diamond) is None
    assert find_cycle(diamond | {"d": [("e", 5)], "e": [("b", 6)]}) == [("b", 3), ("d", 5), ("e", 6)]


def test_module_level_imports_form_no_cycle():
    cycle = find_cycle(module_graph())
    assert cycle is None, "import cycle:\n" + "\n".join(
        f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} imports {cycle[(i + 1) % len(cycle)][0]}"
        for i, (name, line) in enumerate(cycle))


# The offline quantizers (`nimblelm quantize`: calibration, GPTQ, AWQ, SmoothQuant) are built on the engine:
# they load a model through it and quantize its layers in place. The engine loads and serves every model,
# quantized ones included, through the formats alone (quantization/formats.py), never through them.
ENGINE_LAYERS = ("nimblelm.engine", "nimblelm.models", "nimblelm.layers")
OFFLINE_QUANTIZERS = tuple(
    f"nimblelm.quantization.{name}" for name in ("quantize", "calibration", "gptq", "awq", "smoothquant", "smoothing")
)


def test_the_engine_never_reaches_the_offline_quantizers():
    """Not directly, nor through another module, at module level or inside a function."""
    offences = []
    for name in MODULES:
        if not any(in_layer(name, layer) for layer in ENGINE_LAYERS):
            continue
        seen, chain = {name}, [(name, [])]
        while chain:
            current, via = chain.pop()
            for module, line, _ in imports(current):
                step = [*via, f"{MODULES[current].relative_to(PACKAGE.parent)}:{line}"]
                if module in OFFLINE_QUANTIZERS:
                    offences.append(" -> ".join([*step, module]))
                elif module not in seen:
                    seen.add(module)
                    chain.append((module, step))
    assert not offences, "the engine imports offline quantizers:\n" + "\n".join(dict.fromkeys(offences))
