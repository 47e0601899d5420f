"""The layout of the code: no import circles among our modules, and the library imports
nothing of the application (read from the source with ast, so imports inside functions,
which no import at start-up would reach, count too)."""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ("proxynorm",)
APPLICATION = ("datasets", "models", "train", "analysis", "benchmarks")


def module_files():
    """{module name: path} of every .py file of the packages."""
    modules = {}
    for package in LIBRARY + APPLICATION:
        for folder, _, names in os.walk(os.path.join(REPO, package)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    parts = os.path.relpath(path, REPO)[:-len(".py")].split(os.sep)
                    modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported(module, path, known):
    """The modules of `known` that `module` imports anywhere in its file. `from a import b`
    imports a.b when that is a module, else a. The parent packages that Python imports on
    the way are no edges: else every module that its package's __init__ imports would be
    in a circle with it."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..a import b
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        else:
            continue
        targets.update(name for name in names if name in known and name != module)
    return targets


def import_graph():
    modules = module_files()
    return {module: imported(module, path, modules) for module, path in modules.items()}


def find_cycle(graph):
    """One import circle as [a, b, ..., a], or None."""
    state = {}  # module -> "open" while on the path, "done" once every path from it is

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def test_the_graph_sees_imports_in_functions():
    """The graph is read right: a lazy import inside a function is an edge."""
    graph = import_graph()
    assert "train.config" in graph["train.__main__"]  # at module level
    assert "train.loop" in graph["train.__main__"]  # inside main()
    assert "train.checkpoint" in graph["train.evaluate"]  # from train import checkpoint
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_the_library_imports_nothing_of_the_application():
    reaching = sorted(f"{module} -> {target}" for module, targets in import_graph().items()
                      if module.split(".")[0] in LIBRARY for target in targets
                      if target.split(".")[0] in APPLICATION)
    assert reaching == []
