"""The package's modules import each other without a cycle, at module level.

Read from the source with `ast`, imports inside functions included: a
cycle held together by a function-level import is still a cycle, only
hidden until the function runs.
"""

import ast
import pathlib

import keras
import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "keras_gemma2"

# The import graph does not depend on the backend: run once, on JAX.
pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="backend-independent"
)

# Module -> why it imports keras_gemma2 modules inside functions.
FUNCTION_LEVEL_EXCEPTIONS = {
    "keras_gemma2.cli.commands": (
        "Keras reads KERAS_BACKEND once, when first imported, and the "
        "package's models import Keras: each command imports them after "
        "`--backend` has set it, and `--help` imports no backend at all."
    ),
}


def module_files(package_dir):
    """`{dotted module name: path}` for every `.py` file of a package."""
    package_dir = pathlib.Path(package_dir)
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _ancestors(name):
    """`a.b.c` -> `a`, `a.b`: the packages Python imports before it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(node, module, is_package):
    """The dotted names that an import statement makes Python import."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        parts = package.split(".")
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
    # `from pkg import name` imports `pkg`, and `pkg.name` where that is a
    # module (the caller keeps only names that are modules).
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _imports(tree, module, is_package):
    """`(dotted names, line, inside a function)` of each import statement."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = _imported(child, module, is_package)
                found.append((names, child.lineno, in_function))
            functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            visit(child, in_function or isinstance(child, functions))

    visit(tree, False)
    return found


def import_graph(package_dir):
    """`{module: {imported module: [(line, inside a function), ...]}}`.

    Importing `a.b.c` imports the packages `a` and `a.b` first, so those
    count too; but not a module's own parent packages, which Python has
    imported before the module (a submodule taking a name from its
    package's `__init__` is no cycle).
    """
    modules = module_files(package_dir)
    graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        own_parents = set(_ancestors(module))
        edges = graph[module] = {}
        for names, line, in_function in _imports(tree, module, is_package):
            targets = {t for name in names for t in [*_ancestors(name), name]}
            for target in sorted(targets & set(modules) - own_parents):
                if target != module:
                    edges.setdefault(target, []).append((line, in_function))
    return graph


def find_cycles(graph):
    """One cycle `[m1, m2, ..., m1]` per strongly connected component."""
    return sorted(_shortest_cycle(graph, c) for c in components(graph))


def components(graph):
    """The strongly connected components of more than one module."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def connect(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def _shortest_cycle(graph, component):
    """The shortest way from the first module back to it, in `component`."""
    start = min(component)
    came_from = {start: None}
    frontier = [start]
    last = None
    while last is None:  # breadth first: the first way back is shortest
        reached = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start and last is None:
                    last = v
                elif w in component and w not in came_from:
                    came_from[w] = v
                    reached.append(w)
        frontier = reached
    cycle = [start]
    while last is not None:
        cycle.insert(1, last)
        last = came_from[last]
    return cycle[1:] + [start]


def describe(cycle, graph):
    """`a -> b (line 3) -> a (line 9, in a function)`."""
    steps = [cycle[0]]
    for source, target in zip(cycle, cycle[1:]):
        line, in_function = graph[source][target][0]
        where = f"line {line}" + (", in a function" if in_function else "")
        steps.append(f"{target} ({source} {where})")
    return " -> ".join(steps)


def check_no_cycles(graph):
    """Fails, printing each cycle, when the import graph has any."""
    cycles = [
        f"{describe(_shortest_cycle(graph, c), graph)}\n"
        f"  (modules in the loop: {', '.join(sorted(c))})"
        for c in sorted(components(graph), key=min)
    ]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def function_level_imports(graph):
    """`[(module, imported module, line)]` of imports inside functions."""
    return sorted(
        (module, target, line)
        for module, edges in graph.items()
        for target, sites in edges.items()
        for line, in_function in sites
        if in_function
    )


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert "keras_gemma2.backbone" in graph  # the walk found the package
    check_no_cycles(graph)


def test_own_modules_are_imported_at_module_level():
    graph = import_graph(PACKAGE)
    found = function_level_imports(graph)
    unexpected = [
        f"{module} line {line}: {target}"
        for module, target, line in found
        if module not in FUNCTION_LEVEL_EXCEPTIONS
    ]
    assert not unexpected, (
        "imports of keras_gemma2 modules inside functions (move them to "
        "the top; if that makes a cycle, move the code that needs them):\n"
        + "\n".join(unexpected)
    )
    # Each exception is still needed.
    assert {module for module, _, _ in found} == set(FUNCTION_LEVEL_EXCEPTIONS)


def _uncommented_function_level_imports(path):
    """Lines of imports inside functions with no comment saying why.

    The comment may be on the import's line or on the lines just above it
    (other imports, comments, a `try:`).
    """
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    missing = []
    for names, line, in_function in _imports(ast.parse(text), "", False):
        if not in_function:
            continue
        above = line - 1  # 1-based line numbers: lines[line - 1] is it
        block = [lines[above]]
        while above > 0:
            previous = lines[above - 1].strip()
            if not (
                previous.startswith(("#", "import ", "from ", "try:"))
                and previous
            ):
                break
            block.append(previous)
            above -= 1
        if not any("#" in text_line for text_line in block):
            missing.append(
                f"{path.name} line {line}: {lines[line - 1].strip()}"
            )
    return missing


def test_each_function_level_import_says_why():
    # Only optional dependencies and backend-specific modules stay inside
    # functions, each with a one-line reason.
    missing = [
        entry
        for module, path in module_files(PACKAGE).items()
        if module not in FUNCTION_LEVEL_EXCEPTIONS
        for entry in _uncommented_function_level_imports(path)
    ]
    assert not missing, "\n".join(missing)


def _write_package(root, files):
    package = root / "pkg"
    package.mkdir()
    for name, text in files.items():
        (package / name).write_text(text)
    return package


def test_a_cycle_through_a_function_level_import_is_reported(tmp_path):
    package = _write_package(
        tmp_path,
        {
            # A submodule taking a name from its own package: no cycle.
            "__init__.py": "from pkg import c\n\nVERSION = 1\n",
            "c.py": "from pkg import VERSION\n",
            # Two siblings, one importing the other inside a function.
            "a.py": "from pkg import b\n",
            "b.py": "import os\n\n\ndef f():\n    from pkg import a\n",
        },
    )
    graph = import_graph(package)
    assert graph["pkg.b"] == {"pkg.a": [(5, True)]}
    cycles = find_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b", "pkg.a"]]
    assert describe(cycles[0], graph) == (
        "pkg.a -> pkg.b (pkg.a line 1) -> pkg.a (pkg.b line 5, in a function)"
    )
    assert function_level_imports(graph) == [("pkg.b", "pkg.a", 5)]
    assert _uncommented_function_level_imports(package / "b.py") == [
        "b.py line 5: from pkg import a"
    ]
    with pytest.raises(AssertionError) as failure:
        check_no_cycles(graph)
    assert "import cycles:" in str(failure.value)
    assert describe(cycles[0], graph) in str(failure.value)


def test_relative_and_dotted_imports_count_as_edges(tmp_path):
    package = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from . import b\n",
            "b.py": "import pkg.a\n",
        },
    )
    graph = import_graph(package)
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
