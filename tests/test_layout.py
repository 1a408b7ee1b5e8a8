"""The package's layout: its import graph has no cycles and follows the layers (the library at the top of
`sgfast/` never imports the server, the built-in model or the command line), and each module of the
server opens with a docstring and stays small. Read from the source with `ast`, lazy imports included."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Installed names of the source folders (setup.py's package_dir).
ROOTS = {"sgfast": os.path.join(REPO, "sgfast"), "sgfast.kernels": os.path.join(REPO, "kernels")}
ENTRY = "sgfast.__main__"
SUBPACKAGES = ("sgfast.serve", "sgfast.shapes")


def module_files():
    """{module name: path} of every module of the package."""
    found = {}
    for package, folder in ROOTS.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            parts = os.path.relpath(dirpath, folder).split(os.sep)
            prefix = ".".join([package] + [p for p in parts if p != "."])
            for name in filenames:
                if name.endswith(".py"):
                    found[prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"] = os.path.join(dirpath, name)
    return found


def imported(module, path, modules):
    """The package's modules that `module` imports anywhere in its file (a function's body too).
    `from a import b` counts as importing `a.b` when that is a module, else `a`."""
    is_package = os.path.basename(path) == "__init__.py"
    here = module if is_package else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {t for t in targets if t in modules and t != module}


def import_graph():
    modules = module_files()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def layer(module):
    if module == ENTRY:
        return "entry"
    for sub in SUBPACKAGES:
        if module == sub or module.startswith(sub + "."):
            return sub
    return "library"


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert {"sgfast", "sgfast.pipeline", "sgfast.kernels.attention_stats", ENTRY, "sgfast.serve.engine", "sgfast.shapes.train"} <= set(graph)
    assert "sgfast.sampler" in graph["sgfast.pipeline"]
    assert "sgfast.kernels.attention_stats" in graph["sgfast.capture"]
    assert "sgfast.shapes.scenes" in graph["sgfast.shapes.train"]  # `from sgfast.shapes import scenes`
    assert "sgfast.serve.cli" in graph[ENTRY]  # the command line dispatches to the subpackages


def test_no_import_cycles():
    graph = import_graph()
    done, path = set(), []

    def visit(module):
        if module in path:
            cycle = path[path.index(module):] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


# Which layers each layer may import: the library only itself; the built-in model the library; the server
# the library and the built-in model (it serves it); the command line all of them. Nothing imports it.
ALLOWED = {
    "library": {"library"},
    "sgfast.shapes": {"library", "sgfast.shapes"},
    "sgfast.serve": {"library", "sgfast.shapes", "sgfast.serve"},
    "entry": {"library", "sgfast.shapes", "sgfast.serve"},
}


def test_layers_never_import_upward():
    wrong = [
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if layer(target) not in ALLOWED[layer(module)]
    ]
    assert not wrong, "\n".join(wrong)


def test_server_modules_say_what_they_own_and_stay_small():
    for module, path in module_files().items():
        if layer(module) != "sgfast.serve":
            continue
        source = open(path).read()
        assert ast.get_docstring(ast.parse(source)), f"{module} has no docstring saying what it owns"
        lines = source.count("\n")
        assert lines <= 420, f"{module} is {lines} lines; split it by concern"
