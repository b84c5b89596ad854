"""The shape of the code (issue 22): ops below modules below applications.

Every module of moa_kernels and moa is parsed with `ast`; its imports are read wherever
they stand (module level, inside functions and classes; `import x` and `from x import y`),
except under `if TYPE_CHECKING:`, which never runs. From them:

- moa_kernels (ops, no module state) imports nothing from moa;
- the library (moa_kernels and moa, the applications aside) never imports an application;
- the library's import graph has no cycle, function-level imports included (a lazy import
  that dodges a circle is still a circle);
- no library file is over MAX_LINES lines;
- no module reads another's private names: `module._name` on an imported module of ours,
  `from ours import _name`, or `obj._name` (obj not self, cls or super()) where `_name` is
  a private attribute that a class of another module of ours defines (and this module's
  classes do not). PRIVATE_READS lists the justified exceptions, each with its reason.

The order the graph then follows is written out in README.md ("Architecture") and
docs/DESIGN.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("moa_kernels", "moa")
MAX_LINES = 650
# The applications: the `moa` command and its subcommands, in moa/cli/ (and, until they
# move there, the old flat modules of the same names).
APPLICATIONS = ("moa.cli", "moa.__main__", "moa.train", "moa.evaluate", "moa.compare",
                "moa.data", "moa.loading", "moa.outputs", "moa.demo", "moa.check",
                "moa.bench", "moa.plots")
# (module, accessed name): why that module may read another's private name.
PRIVATE_READS: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES
            for path in sorted((ROOT / package).rglob("*.py"))}


MODULES = all_modules()


def is_application(name: str) -> bool:
    return any(name == app or name.startswith(app + ".") for app in APPLICATIONS)


LIBRARY = {name: path for name, path in MODULES.items() if not is_application(name)}


def _known(name: str) -> str | None:
    """The module of ours that `name` (a dotted path) lands in, or None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


class _Reader(ast.NodeVisitor):
    """Imports (target module, line) and private reads (name, line) of one module."""

    def __init__(self, name: str, is_package: bool) -> None:
        self.name, self.is_package = name, is_package
        self.imports: list[tuple[str, int]] = []
        self.module_aliases: dict[str, str] = {}  # local name -> a module of ours
        self.private_imports: list[tuple[str, int]] = []
        self.attribute_reads: list[tuple[ast.expr, str, int]] = []

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
                (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            target = _known(alias.name)
            if target is None:
                continue
            self.imports.append((target, node.lineno))
            if alias.asname:
                self.module_aliases[alias.asname] = target
            else:  # `import a.b`: binds `a`
                self.module_aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.name if self.is_package else self.name.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        if _known(base) is None:
            return
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if submodule in MODULES:
                self.imports.append((submodule, node.lineno))
                self.module_aliases[alias.asname or alias.name] = submodule
                continue
            self.imports.append((_known(base), node.lineno))
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                self.private_imports.append((f"{base}.{alias.name}", node.lineno))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.attribute_reads.append((node.value, node.attr, node.lineno))
        self.generic_visit(node)


def read(name: str) -> _Reader:
    path = MODULES[name]
    reader = _Reader(name, path.name == "__init__.py")
    reader.visit(ast.parse(path.read_text(), filename=str(path)))
    return reader


READERS = {name: read(name) for name in MODULES}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_attributes_of_our_classes() -> dict[str, set[str]]:
    """Private names our classes define (methods, class attributes, self._x assignments),
    each with the modules that define it."""
    names: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        found.add(item.name)
                    elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                        targets = item.targets if isinstance(item, ast.Assign) else \
                            [item.target]
                        found.update(t.id for t in targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                    isinstance(node.value, ast.Name) and node.value.id == "self":
                found.add(node.attr)
        for name in found:
            if _private(name):
                names.setdefault(name, set()).add(module)
    return names


def _is_self(value: ast.expr) -> bool:
    if isinstance(value, ast.Name):
        return value.id in ("self", "cls")
    return isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and \
        value.func.id == "super"


def library_graph() -> dict[str, set[str]]:
    return {name: {target for target, _ in READERS[name].imports
                   if target in LIBRARY and target != name}
            for name in LIBRARY}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for following in sorted(graph[node]):
            if state.get(following) == 1:
                return path[path.index(following):] + [following]
            if following not in state:
                found = visit(following)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


# ---------------------------------------------------------------------------------------

def test_the_packages_are_found():
    # the checks below would pass vacuously on an empty set
    assert {"moa_kernels.layout", "moa.config", "moa.model"} <= set(LIBRARY)
    assert all(name.startswith(PACKAGES) for name in MODULES)


def test_moa_kernels_imports_nothing_from_moa():
    offenders = [f"{name}:{line} imports {target}"
                 for name in MODULES if name.split(".")[0] == "moa_kernels"
                 for target, line in READERS[name].imports if target.split(".")[0] == "moa"]
    assert not offenders, "moa_kernels (ops) must not import moa:\n" + "\n".join(offenders)


def test_the_library_never_imports_the_applications():
    offenders = [f"{name}:{line} imports {target}"
                 for name in LIBRARY for target, line in READERS[name].imports
                 if is_application(target)]
    assert not offenders, "library modules import applications:\n" + "\n".join(offenders)


def test_the_library_import_graph_has_no_cycle():
    cycle = find_cycle(library_graph())
    assert cycle is None, "import cycle (function-level imports included): " + \
        " -> ".join(cycle)


def test_find_cycle_finds_one():
    # the check above must be able to fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_library_file_is_too_long():
    long = {name: count for name, path in LIBRARY.items()
            if (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"library files over {MAX_LINES} lines: {long}"


def test_no_module_reads_another_modules_private_names():
    ours = private_attributes_of_our_classes()
    offenders = []
    for name in MODULES:
        reader = READERS[name]
        for target, line in reader.private_imports:
            offenders.append((name, target.rpartition(".")[2], f"{name}:{line} imports "
                                                               f"{target}"))
        for value, attribute, line in reader.attribute_reads:
            if not _private(attribute) or _is_self(value):
                continue
            module = reader.module_aliases.get(value.id) if isinstance(value, ast.Name) \
                else None
            if module is not None and module != name:
                offenders.append((name, attribute, f"{name}:{line} reads "
                                                   f"{module}.{attribute}"))
            elif module is None and name not in ours.get(attribute, {name}):
                offenders.append((name, attribute, f"{name}:{line} reads "
                                                   f"{ast.unparse(value)}.{attribute}"))
    unexplained = [text for module, attribute, text in offenders
                   if (module, attribute) not in PRIVATE_READS]
    assert not unexplained, "private names read across modules:\n" + "\n".join(unexplained)
