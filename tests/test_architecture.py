"""The package graph of docs/design.md ("which package may import which"), checked on the source.

Every module of qwen_jax is parsed (AST; nothing is imported) and its imports, at module top and
inside functions, are checked against these rules:

- every module belongs to a layer of `LAYERS`; a module imports only its own package and layers
  below its own (plus the few sideways imports `SIDEWAYS` lists);
- the library never imports a command-line module (`CLI_MODULES`, `qwen_jax.cli.*`);
- no import cycles between modules (function-level imports count);
- imports of qwen_jax modules sit at module top; the one exception is a command-line module's
  `run()` importing a module of its own feature that needs an optional package;
- optional packages (`qwen_jax.extras.EXTRAS`) come through `qwen_jax.extras.require` or are
  imported directly only by their feature's package (serve/ for serve, train/ for train), and
  nothing that `import qwen_jax` or `qwen-jax --help` loads imports one at module level;
- error classes live in `qwen_jax.errors` (except the private control-flow ones and `ALLOWED_ERRORS`).

Each failure names the module and line, what it imports, and the rule it breaks.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "qwen_jax"

# Bottom to top: a module may import its own package (unit) and any unit of a lower layer.
LAYERS: list[tuple[str, ...]] = [
    ("qwen_jax.errors", "qwen_jax.version"),
    ("qwen_jax.extras", "qwen_jax.config", "qwen_jax.sharding", "qwen_jax.tokenizer", "qwen_jax.compilation"),
    ("qwen_jax.ops",),
    ("qwen_jax.model",),
    ("qwen_jax.checkpoints",),
    ("qwen_jax.load", "qwen_jax.memory"),
    ("qwen_jax.generation",),
    ("qwen_jax.engine",),
    ("qwen_jax.serve", "qwen_jax.convert", "qwen_jax.train"),
]
SIDEWAYS = {("qwen_jax.train", "qwen_jax.convert")}  # (importer's unit, imported unit)
# Layer 9: the command-line modules (they may import anything) and qwen_jax/__init__.py (re-exports).
CLI_PACKAGE = "qwen_jax.cli"
CLI_MODULES = {"qwen_jax.serve.cli", "qwen_jax.train.cli", "qwen_jax.convert.cli", "qwen_jax.convert.cli_export"}
TOP = "qwen_jax"
# The packages whose modules may import their extra's packages directly (reached only from `run()`).
FEATURE_PACKAGES = {"serve": "qwen_jax.serve", "train": "qwen_jax.train"}
# Exception classes that may live outside qwen_jax.errors: an HTTP response value, not an error of the library.
ALLOWED_ERRORS = {"qwen_jax.serve.protocol.RequestError"}
REQUIRE_FUNCTIONS = {"require", "require_extra"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


SOURCES = {_module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _extras() -> dict[str, tuple[str, ...]]:
    """`EXTRAS` of qwen_jax/extras.py, read from its source."""
    for node in ast.parse((PACKAGE_DIR / "extras.py").read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "EXTRAS" for t in targets):
            return ast.literal_eval(node.value)
    raise AssertionError("qwen_jax/extras.py defines no EXTRAS")


EXTRAS = _extras()
OPTIONAL = {module: extra for extra, modules in EXTRAS.items() for module in modules}  # top-level name -> extra


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a qwen_jax module, or a third-party module's dotted name
    line: int
    function: str | None  # the enclosing function; None at module level (class bodies run at import too)
    type_only: bool = False  # under `if TYPE_CHECKING:`
    via_require: bool = False  # `qwen_jax.extras.require(...)` / `require_extra(...)`

    @property
    def internal(self) -> bool:
        return self.target == TOP or self.target.startswith(TOP + ".")

    @property
    def where(self) -> str:
        inside = f" inside {self.function}()" if self.function else ""
        how = " through require()" if self.via_require else ""
        return f"{self.importer}:{self.line} imports {self.target}{how}{inside}"


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool):
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.functions: list[str] = []
        self.type_only = 0
        self.imports: list[Import] = []

    def _add(self, target: str, node: ast.AST, via_require: bool = False) -> None:
        self.imports.append(
            Import(
                self.module,
                target,
                node.lineno,
                self.functions[-1] if self.functions else None,
                self.type_only > 0,
                via_require,
            )
        )

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        # Decorators and defaults run where the function is defined, not inside it.
        for expression in [*getattr(node, "decorator_list", []), *node.args.defaults, *node.args.kw_defaults]:
            if expression is not None:
                self.visit(expression)
        self.functions.append(getattr(node, "name", "<lambda>"))
        for statement in node.body if isinstance(node.body, list) else [node.body]:
            self.visit(statement)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        type_checking = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        self.visit(node.test)
        self.type_only += type_checking
        for statement in node.body:
            self.visit(statement)
        self.type_only -= type_checking
        for statement in node.orelse:
            self.visit(statement)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if source != "__future__":
            for alias in node.names:
                # `from package import module` imports that module; `from module import name` the module.
                candidate = f"{source}.{alias.name}"
                self._add(candidate if candidate in SOURCES else source, node)

    def visit_Call(self, node: ast.Call) -> None:
        function = node.func
        name = function.id if isinstance(function, ast.Name) else getattr(function, "attr", None)
        if name in REQUIRE_FUNCTIONS and node.args and isinstance(node.args[0], ast.Constant):
            argument = node.args[0].value
            if name == "require_extra":
                for module in EXTRAS.get(argument, ()):
                    self._add(module, node, via_require=True)
            else:
                self._add(argument, node, via_require=True)
        self.generic_visit(node)


def _collect() -> list[Import]:
    imports = []
    for module, path in SOURCES.items():
        collector = _ImportCollector(module, path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        imports += collector.imports
    return list(dict.fromkeys(imports))  # `from m import a, b` is one import of m


IMPORTS = _collect()


def _internal(imports: list[Import]) -> list[Import]:
    return [i for i in imports if i.internal and i.target != i.importer]


def is_cli(module: str) -> bool:
    return module in CLI_MODULES or module == CLI_PACKAGE or module.startswith(CLI_PACKAGE + ".")


def unit_and_layer(module: str) -> tuple[str, int] | None:
    """The package (unit) a module belongs to and its layer; 9 for the CLI and qwen_jax/__init__."""
    if is_cli(module) or module == TOP:
        return module, 9
    for layer, units in enumerate(LAYERS):
        for unit in units:
            if module == unit or module.startswith(unit + "."):
                return unit, layer
    return None


def layer_violations(imports: list[Import]) -> list[str]:
    violations = []
    for i in _internal(imports):
        if i.target not in SOURCES:
            violations.append(f"{i.where}, which is no module of qwen_jax")
            continue
        if unit_and_layer(i.importer) is None or unit_and_layer(i.target) is None:
            continue  # reported by test_every_module_has_a_layer
        (unit, layer), (target_unit, target_layer) = unit_and_layer(i.importer), unit_and_layer(i.target)
        if layer == 9:
            continue  # the command line and qwen_jax/__init__.py may import anything
        if is_cli(i.target):
            violations.append(f"{i.where}: the library never imports a command-line module")
        elif i.target == TOP:
            violations.append(
                f"{i.where} (qwen_jax/__init__.py, which re-exports everything): import from the defining module"
            )
        elif unit != target_unit and target_layer >= layer and (unit, target_unit) not in SIDEWAYS:
            violations.append(
                f"{i.where}: {unit} (layer {layer}) may import only its own package and layers below {layer}, "
                f"and {target_unit} is layer {target_layer}"
            )
    return violations


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(edges.get(node, ())):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return components


def _path(edges: dict[str, set[str]], start: str, goal: str, within: set[str]) -> list[str]:
    """A shortest import path start -> ... -> goal through the modules `within`."""
    previous: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in sorted(edges.get(node, ())):
            if successor in within and successor not in previous:
                previous[successor] = node
                queue.append(successor)
    path, node = [], goal
    while node is not None:
        path.append(node)
        node = previous[node]
    return path[::-1]


def cycle_violations(imports: list[Import]) -> list[str]:
    edges: dict[str, set[str]] = {}
    first_import: dict[tuple[str, str], Import] = {}
    for i in _internal(imports):
        if i.target in SOURCES:
            edges.setdefault(i.importer, set()).add(i.target)
            first_import.setdefault((i.importer, i.target), i)
    violations = []
    for component in _cycles(edges):
        members = set(component)
        first = component[0]
        # A cycle through `first`: to one of its successors in the component, and back.
        cycle = [first] + _path(edges, min(edges[first] & members), first, members)
        steps = ", ".join(first_import[a, b].where for a, b in zip(cycle, cycle[1:]))
        violations.append(f"import cycle {' -> '.join(cycle)} ({steps}); the component is {', '.join(component)}")
    return violations


def _optional_extra(i: Import) -> str | None:
    return None if i.internal else OPTIONAL.get(i.target.split(".")[0])


def _executed_at_import(i: Import) -> bool:
    return i.function is None and not i.type_only


def optional_modules(imports: list[Import]) -> dict[str, str]:
    """Modules that cannot be imported without an extra: module -> why (the import that needs it)."""
    needs: dict[str, str] = {}
    for i in imports:
        extra = _optional_extra(i)
        if extra and _executed_at_import(i):
            needs.setdefault(i.importer, f"{i.where} (extra [{extra}])")
    changed = True
    while changed:  # importing a module that needs an extra needs it too
        changed = False
        for i in _internal(imports):
            if _executed_at_import(i) and i.target in needs and i.importer not in needs:
                needs[i.importer] = f"{i.where}, and {needs[i.target]}"
                changed = True
    return needs


def core_closure(imports: list[Import]) -> dict[str, str | None]:
    """What `import qwen_jax` and `qwen-jax --help` load: module -> the module that imported it first."""
    entry_points = [TOP, CLI_PACKAGE, *sorted(m for m in SOURCES if is_cli(m))]
    edges: dict[str, set[str]] = {}
    for i in _internal(imports):
        if _executed_at_import(i) and i.target in SOURCES:
            edges.setdefault(i.importer, set()).add(i.target)
    for module in SOURCES:  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        parent = module.rpartition(".")[0]
        if parent:
            edges.setdefault(module, set()).add(parent)
    reached: dict[str, str | None] = {m: None for m in entry_points}
    queue = deque(entry_points)
    while queue:
        module = queue.popleft()
        for target in sorted(edges.get(module, ())):
            if target not in reached:
                reached[target] = module
                queue.append(target)
    return reached


def _chain(reached: dict[str, str | None], module: str) -> str:
    chain = [module]
    while reached[chain[-1]] is not None:
        chain.append(reached[chain[-1]])
    return " -> ".join(reversed(chain))


def _feature_package(cli_module: str) -> str | None:
    """The package whose implementation a command-line module's run() may load: serve.cli -> qwen_jax.serve."""
    return cli_module.rpartition(".")[0] if cli_module in CLI_MODULES else None


def function_level_violations(imports: list[Import]) -> list[str]:
    needs_extra = optional_modules(imports)
    violations = []
    for i in _internal(imports):
        if i.function is None and not i.via_require:
            continue
        feature = _feature_package(i.importer)
        own_run = feature is not None and i.function == "run" and i.target.startswith(feature + ".")
        if i.via_require:
            rule = "qwen_jax modules are imported with import statements, not require()"
        elif own_run and i.target in needs_extra:
            continue  # layering.md's exception (b): `qwen-jax --help` must work without the extra
        elif own_run:
            rule = f"{i.target} needs no optional package, so it belongs at module top"
        else:
            rule = (
                "imports go at module top; only a command-line module's run() may import its own feature's "
                "implementation (one that needs an optional package)"
            )
        violations.append(f"{i.where}: {rule}")
    return violations


def optional_package_violations(imports: list[Import]) -> list[str]:
    reached = core_closure(imports)
    violations = []
    needs_extra: dict[str, Import] = {}  # module -> its first module-level import of an optional package
    for i in imports:
        extra = _optional_extra(i)
        if extra is None:
            continue
        if _executed_at_import(i):
            needs_extra.setdefault(i.importer, i)
        if i.via_require:
            continue
        package = i.target.split(".")[0]
        feature = FEATURE_PACKAGES.get(extra)
        use_require = f"import it with qwen_jax.extras.require({package!r}, extra={extra!r})"
        if feature is None or not (i.importer == feature or i.importer.startswith(feature + ".")):
            violations.append(
                f"{i.where}: {package} belongs to the [{extra}] extra; outside {feature or 'a feature package'} "
                f"{use_require}"
            )
        elif i.function is not None and i.importer in reached:
            violations.append(
                f"{i.where}: {package} belongs to the [{extra}] extra, and `import qwen_jax` / `qwen-jax --help` "
                f"load {i.importer} ({_chain(reached, i.importer)}), so without the extra this fails with a bare "
                f"ModuleNotFoundError: {use_require}"
            )
    # Where the core install meets an extra: a module that `import qwen_jax` / `qwen-jax --help` load imports an
    # optional package at module level (the chain shows which import brought it in).
    for module, i in sorted(needs_extra.items()):
        if module in reached:
            violations.append(
                f"{i.where} (extra [{_optional_extra(i)}]) at module level, yet `import qwen_jax` / `qwen-jax --help` "
                f"load {module} ({_chain(reached, module)}): the core install must be enough for those"
            )
    return violations


def _exception_classes() -> list[tuple[str, ast.ClassDef]]:
    """Every class of qwen_jax that derives from an exception (a built-in one or another such class)."""
    builtin_exceptions = {
        name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)
    }
    classes = []
    for module, path in SOURCES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                classes.append((module, node))
    exception_names = set(builtin_exceptions)
    found: list[tuple[str, ast.ClassDef]] = []
    changed = True
    while changed:
        changed = False
        for module, node in classes:
            bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
            if node.name not in exception_names and bases & exception_names:
                exception_names.add(node.name)
                found.append((module, node))
                changed = True
    return found


def _report(violations: list[str]) -> None:
    assert not violations, f"{len(violations)} violation(s) of the package graph:\n" + "\n".join(violations)


# --------------------------------------------------------------------------- the rules on qwen_jax


def test_every_module_has_a_layer():
    assert len(SOURCES) > 50  # the scan found the package
    _report(
        [
            f"{module} ({SOURCES[module].relative_to(ROOT)}) is in no layer: add it to LAYERS here and to "
            "the package graph of docs/design.md"
            for module in SOURCES
            if unit_and_layer(module) is None
        ]
    )


def test_imports_follow_the_layers():
    _report(layer_violations(IMPORTS))


def test_no_import_cycles():
    _report(cycle_violations(IMPORTS))


def test_imports_of_qwen_jax_modules_at_module_top():
    _report(function_level_violations(IMPORTS))


def test_optional_packages_only_through_require_or_their_feature():
    _report(optional_package_violations(IMPORTS))


def test_error_classes_live_in_errors():
    found = _exception_classes()
    assert any(node.name == "QwenJaxError" for _, node in found)  # the scan recognises the hierarchy
    _report(
        [
            f"{module}:{node.lineno} defines {node.name}: errors live in qwen_jax.errors (one hierarchy under "
            "QwenJaxError); only private control-flow exceptions may be defined elsewhere"
            for module, node in found
            if module != "qwen_jax.errors"
            and not node.name.startswith("_")
            and f"{module}.{node.name}" not in ALLOWED_ERRORS
        ]
    )


# --------------------------------------------------------------------------- the checker itself


def _imports_of(source: str, module: str = "qwen_jax.serve.example") -> list[Import]:
    collector = _ImportCollector(module, is_package=False)
    collector.visit(ast.parse(source))
    return collector.imports


def test_collector_sees_every_kind_of_import():
    source = """
import qwen_jax.config
from qwen_jax.checkpoints import orbax
from qwen_jax.load import load_model
from . import tools
from .. import errors
from qwen_jax.extras import require
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from qwen_jax.engine.core import Engine
yaml = require("yaml", extra="train")

class Holder:
    from qwen_jax import sharding

def f(x=require("gguf", extra="gguf")):
    from qwen_jax.generation import api
    return lambda: __import__("os")
"""
    found = {(i.target, i.function, i.type_only, i.via_require) for i in _imports_of(source)}
    assert ("qwen_jax.config", None, False, False) in found
    assert ("qwen_jax.checkpoints.orbax", None, False, False) in found  # a module, not the package
    assert ("qwen_jax.load", None, False, False) in found  # a name of the module
    assert ("qwen_jax.serve.tools", None, False, False) in found  # relative imports resolve
    assert ("qwen_jax.errors", None, False, False) in found
    assert ("qwen_jax.engine.core", None, True, False) in found
    assert ("yaml", None, False, True) in found
    assert ("qwen_jax.sharding", None, False, False) in found  # class bodies run at import
    assert ("gguf", None, False, True) in found  # defaults run where the function is defined
    assert ("qwen_jax.generation.api", "f", False, False) in found


def test_cycle_finder_and_layers():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _path(edges, "b", "a", {"a", "b", "c"}) == ["b", "c", "a"]
    assert unit_and_layer("qwen_jax.ops.attention.xla") == ("qwen_jax.ops", 2)
    assert unit_and_layer("qwen_jax.serve.cli") == ("qwen_jax.serve.cli", 9)
    assert unit_and_layer("qwen_jax.serve.app") == ("qwen_jax.serve", 8)
    assert unit_and_layer("qwen_jax.nowhere") is None


def test_core_closure_holds_the_entry_points_and_their_packages():
    reached = core_closure(IMPORTS)
    for module in ("qwen_jax", "qwen_jax.cli.main", "qwen_jax.serve.cli", "qwen_jax.train.cli", "qwen_jax.load"):
        assert module in reached
    assert reached["qwen_jax.serve"] is not None  # imported as the package of qwen_jax.serve.cli
    assert "qwen_jax.serve.app" not in reached  # loaded by serve's run() only


def test_each_rule_reports_what_breaks_it():
    """Synthetic imports between real modules, one per way to break a rule: each is caught and named."""

    def imports(*extra: Import) -> list[Import]:
        return IMPORTS + list(extra)

    upward = Import("qwen_jax.model.linear", "qwen_jax.generation.api", 7, None)
    [message] = set(layer_violations(imports(upward))) - set(layer_violations(IMPORTS))
    assert message == (
        "qwen_jax.model.linear:7 imports qwen_jax.generation.api: qwen_jax.model (layer 3) may import only its own "
        "package and layers below 3, and qwen_jax.generation is layer 6"
    )
    sideways = Import("qwen_jax.convert.common", "qwen_jax.train.data", 3, None)
    assert any("qwen_jax.convert (layer 8)" in v for v in layer_violations([sideways]))
    assert not layer_violations([Import("qwen_jax.train.data", "qwen_jax.convert.to_hf", 3, None)])  # SIDEWAYS
    to_cli = Import("qwen_jax.engine.core", "qwen_jax.cli.arguments", 9, "submit")
    assert layer_violations([to_cli]) == [
        "qwen_jax.engine.core:9 imports qwen_jax.cli.arguments inside submit(): "
        "the library never imports a command-line module"
    ]
    to_top = Import("qwen_jax.load", "qwen_jax", 2, None)
    assert "re-exports everything" in layer_violations([to_top])[0]

    back = Import("qwen_jax.errors", "qwen_jax.config", 4, "explain", type_only=True)
    forth = Import("qwen_jax.config", "qwen_jax.errors", 16, None)
    assert cycle_violations([back, forth]) == [
        "import cycle qwen_jax.config -> qwen_jax.errors -> qwen_jax.config (qwen_jax.config:16 imports "
        "qwen_jax.errors, qwen_jax.errors:4 imports qwen_jax.config inside explain()); the component is "
        "qwen_jax.config, qwen_jax.errors"
    ]

    lazy = Import("qwen_jax.load", "qwen_jax.tokenizer", 40, "load")
    assert function_level_violations([lazy]) == [
        "qwen_jax.load:40 imports qwen_jax.tokenizer inside load(): imports go at module top; only a command-line "
        "module's run() may import its own feature's implementation (one that needs an optional package)"
    ]
    fastapi_app = Import("qwen_jax.serve.app", "fastapi", 20, None)
    server = Import("qwen_jax.serve.cli", "qwen_jax.serve.app", 84, "run")
    plain = Import("qwen_jax.serve.cli", "qwen_jax.serve.tools", 85, "run")
    assert function_level_violations([fastapi_app, server, plain]) == [
        "qwen_jax.serve.cli:85 imports qwen_jax.serve.tools inside run(): qwen_jax.serve.tools needs no optional "
        "package, so it belongs at module top"
    ]
    hidden = Import("qwen_jax.load", "qwen_jax.checkpoints.hub", 41, None, via_require=True)
    assert "not require()" in function_level_violations([hidden])[0]

    bare_gguf = Import("qwen_jax.checkpoints.gguf", "gguf", 397, "_parse")
    assert optional_package_violations([bare_gguf]) == [
        "qwen_jax.checkpoints.gguf:397 imports gguf inside _parse(): gguf belongs to the [gguf] extra; outside a "
        "feature package import it with qwen_jax.extras.require('gguf', extra='gguf')"
    ]
    assert not optional_package_violations(
        [Import("qwen_jax.checkpoints.gguf", "gguf", 397, "_parse", via_require=True)]
    )
    eager = Import("qwen_jax.engine.core", "qwen_jax.serve.app", 12, None)
    added = set(optional_package_violations(imports(eager))) - set(optional_package_violations(IMPORTS))
    assert (
        "qwen_jax.serve.app:20 imports fastapi (extra [serve]) at module level, yet `import qwen_jax` / "
        "`qwen-jax --help` load qwen_jax.serve.app (qwen_jax -> qwen_jax.engine.core -> qwen_jax.serve.app): "
        "the core install must be enough for those"
    ) in added
    assert len(added) == 3  # serve.app, serve.metrics (prometheus_client), serve.protocol (pydantic)
    not_an_extra = Import("qwen_jax.tokenizer", "transformers", 3, None, via_require=True)
    assert optional_package_violations(imports(not_an_extra)) == optional_package_violations(IMPORTS)
    module_level_require = Import("qwen_jax.tokenizer", "gguf", 3, None, via_require=True)
    added = set(optional_package_violations(imports(module_level_require))) - set(optional_package_violations(IMPORTS))
    assert added == {
        "qwen_jax.tokenizer:3 imports gguf through require() (extra [gguf]) at module level, yet `import qwen_jax` "
        "/ `qwen-jax --help` load qwen_jax.tokenizer (qwen_jax -> qwen_jax.tokenizer): the core install must be "
        "enough for those"
    }
    yaml_in_cli = Import("qwen_jax.train.cli", "yaml", 60, "run")
    assert "bare ModuleNotFoundError" in optional_package_violations([yaml_in_cli])[0]
