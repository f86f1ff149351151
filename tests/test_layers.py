"""The layers of docs/architecture.md (*Layers*), enforced.

Every module under ``src/dicomrouter`` belongs to the component with the longest
matching name in :data:`LAYERS` (``dicomrouter.observe.metrics`` to
``observe.metrics``, ``dicomrouter.observe.alerts`` to ``observe``). A component may
import its own modules, the components it builds on, what those build on, and so on
down; nothing else of ours. Imports inside functions and under ``TYPE_CHECKING``
count too. An import inside a function is allowed only where :data:`LAZY` lists it
with its reason: such an import must be a deliberate lazy load, never a way around a
cycle. The checker reads the source with ``ast`` (nothing is imported), so it also
runs on a synthetic tree, which is how the tests below show that it can fail.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dicomrouter"
PACKAGE = "dicomrouter"

#: component -> the components it builds on (the table in docs/architecture.md).
LAYERS: dict[str, frozenset[str]] = {
    name: frozenset(deps)
    for name, deps in {
        # Foundations: no other component of ours.
        "dicomnet": (),
        "units": (),
        "security": (),
        "tls": (),
        "observe.logs": (),
        # The pipeline.
        "rules": ("units",),
        "config": ("rules", "security", "tls"),
        "store": ("config", "observe.logs", "dicomnet"),
        "observe.metrics": ("store",),
        "receive": ("observe.metrics",),
        "queue": ("store",),
        "transforms": ("store",),
        "destinations": ("observe.metrics", "transforms"),
        "retention": ("queue", "observe.metrics"),
        "dispatch": ("destinations", "retention"),
        # The edges, over the same index.
        "control": ("destinations", "retention"),
        "observe": ("control",),
        "edge": ("control",),
        "web": ("edge",),
        "api": ("web", "observe"),
        # Processes and the command line.
        "receivers": ("receive", "control"),
        "children": ("api", "dispatch"),
        "node": ("children", "receivers"),
        "cli": ("node",),
        "__main__": ("cli",),
    }.items()
}

#: Components that may not import even the package's root (``__version__``).
INDEPENDENT = frozenset({"dicomnet", "tls"})

_CLI = "pydicom (and numpy) only after `serve` has excluded numpy: cli/__init__.py"
_CHILD = "each child process imports only what its role needs: children.py"
_SERVER = "api/server.py, as the TLS change found it; to move to module level after it"

#: (importing module, imported module) -> why the import sits inside a function.
LAZY: dict[tuple[str, str], str] = {
    ("dicomrouter.config.problems", "dicomrouter.rules"): "rules load pydicom: "
    "`dicomrouter serve` reads its configuration before it excludes numpy",
    ("dicomrouter.destinations", "dicomrouter.destinations.dicom"): "the sender "
    "(pynetdicom) loads on first use: the HTTP process needs it only for an echo",
    ("dicomrouter.destinations.registry", "dicomrouter.destinations.dicom"): "each kind's "
    "sender loads when the first sender of that kind is made: a process loads only the "
    "client libraries of the kinds it sends to",
    ("dicomrouter.destinations.registry", "dicomrouter.destinations.folder"): "the same",
    ("dicomrouter.destinations.registry", "dicomrouter.destinations.dicomweb"): "the same (httpx)",
    ("dicomrouter.destinations.registry", "dicomrouter.destinations.s3"): "the same (boto3)",
    ("dicomrouter.children", "dicomrouter.control.versions"): _CHILD,
    ("dicomrouter.children", "dicomrouter.dispatch"): _CHILD,
    ("dicomrouter.children", "dicomrouter.store"): _CHILD,
    ("dicomrouter.children", "dicomrouter.store.heartbeat"): _CHILD,
    ("dicomrouter.children", "dicomrouter.api.server"): _CHILD,
    ("dicomrouter.api.server", "dicomrouter.edge.context"): _SERVER,
    ("dicomrouter.api.server", "dicomrouter.store"): _SERVER,
    ("dicomrouter.api.server", "dicomrouter.control.versions"): _SERVER,
    ("dicomrouter.api.server", "dicomrouter.api.app"): _SERVER,
    ("dicomrouter.cli.main", "dicomrouter.children"): _CLI,
    ("dicomrouter.cli.main", "dicomrouter.node"): _CLI,
    ("dicomrouter.cli.main", "dicomrouter.observe.logs"): _CLI,
    ("dicomrouter.cli.main", "dicomrouter.store"): _CLI,
    ("dicomrouter.cli.main", "dicomrouter.destinations"): _CLI,
    ("dicomrouter.cli.main", "dicomrouter.control.destinations"): _CLI,
    ("dicomrouter.cli.main", "dicomrouter.control.errors"): _CLI,
    ("dicomrouter.cli.loops_cmd", "dicomrouter.control.loops"): _CLI,
    ("dicomrouter.cli.nodes_cmd", "dicomrouter.control.nodes"): _CLI,
    ("dicomrouter.cli.nodes_cmd", "dicomrouter.control.errors"): _CLI,
    ("dicomrouter.cli.purge_cmd", "dicomrouter.control.retention"): _CLI,
    ("dicomrouter.cli.purge_cmd", "dicomrouter.retention"): _CLI,
    ("dicomrouter.cli.purge_cmd", "dicomrouter.store"): _CLI,
    ("dicomrouter.cli.queue_cmd", "dicomrouter.store"): _CLI,
    ("dicomrouter.cli.queue_cmd", "dicomrouter.queue.states"): _CLI,
    ("dicomrouter.cli.queue_cmd", "dicomrouter.control.errors"): _CLI,
    ("dicomrouter.cli.queue_cmd", "dicomrouter.control.jobs"): _CLI,
    ("dicomrouter.cli.queue_cmd", "dicomrouter.control.destinations"): _CLI,
    ("dicomrouter.cli.reidentify_cmd", "dicomrouter.control.reidentify"): _CLI,
    ("dicomrouter.cli.reidentify_cmd", "dicomrouter.control.errors"): _CLI,
    ("dicomrouter.cli.reidentify_cmd", "dicomrouter.security"): _CLI,
    ("dicomrouter.cli.reidentify_cmd", "dicomrouter.store"): _CLI,
    ("dicomrouter.cli.rules_cmd", "dicomrouter.config.lint"): _CLI,
    ("dicomrouter.cli.rules_cmd", "dicomrouter.control.routes"): _CLI,
    ("dicomrouter.cli.rules_cmd", "dicomrouter.control.errors"): _CLI,
    ("dicomrouter.cli.rules_cmd", "dicomrouter.config"): _CLI,
    ("dicomrouter.cli.rules_cmd", "dicomrouter.transforms.lint"): _CLI,
    ("dicomrouter.cli.security_cmd", "dicomrouter.config"): _CLI,
    ("dicomrouter.cli.security_cmd", "dicomrouter.control.versions"): _CLI,
    ("dicomrouter.cli.send_cmd", "dicomrouter.destinations"): _CLI,
    ("dicomrouter.cli.send_cmd", "dicomrouter.store"): _CLI,
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    line: int
    target: str  # the imported module
    in_function: bool
    path: Path


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, src: Path) -> list[Import]:
    """Every import of ours in one file, at any depth, with relative imports resolved
    and ``from package import module`` read as an import of the module."""
    name = module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base_name = ".".join(base + ([child.module] if child.module else []))
                else:
                    base_name = child.module or ""
                for alias in child.names:
                    dotted = f"{base_name}.{alias.name}"
                    relative = Path(*dotted.split(".")[1:])
                    is_module = (src / relative).with_suffix(".py").is_file() or (
                        src / relative / "__init__.py"
                    ).is_file()
                    targets.append(dotted if is_module else base_name)
            for target in dict.fromkeys(targets):
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    found.append(Import(name, child.lineno, target, in_function, path))
            visit(child, inside)

    visit(tree, False)
    return found


def component(module: str, layers: Mapping[str, frozenset[str]]) -> str | None:
    """The component of a module: the longest name in ``layers`` it falls under;
    ``""`` for the package's root, None when the table does not place it."""
    if module == PACKAGE:
        return ""
    relative = module[len(PACKAGE) + 1 :]
    best = None
    for name in layers:
        if (relative == name or relative.startswith(name + ".")) and (
            best is None or len(name) > len(best)
        ):
            best = name
    return best


def below(layers: Mapping[str, frozenset[str]]) -> dict[str, set[str]]:
    """component -> every component it may import (its own included)."""
    reach: dict[str, set[str]] = {}

    def walk(name: str, trail: tuple[str, ...]) -> set[str]:
        if name in trail:
            raise ValueError(f"the layers have a cycle: {' -> '.join((*trail, name))}")
        if name not in reach:
            allowed = {name}
            for dep in layers[name]:
                allowed |= walk(dep, (*trail, name))
            reach[name] = allowed
        return reach[name]

    for name in layers:
        walk(name, ())
    return reach


def violations(
    src: Path,
    layers: Mapping[str, frozenset[str]] = LAYERS,
    lazy: Mapping[tuple[str, str], str] = LAZY,
    independent: frozenset[str] = INDEPENDENT,
) -> list[str]:
    """What breaks the layers, one line each, as ``path:line: what``."""
    reach = below(layers)
    problems = []
    for path in sorted(src.rglob("*.py")):
        where = path.relative_to(src.parent)
        module = module_name(path, src)
        own = component(module, layers)
        if own is None:
            problems.append(f"{where}:1: {module} is in no component of the layer table")
            continue
        for imp in imports_of(path, src):
            spot = f"{where}:{imp.line}: {module} imports {imp.target}"
            theirs = component(imp.target, layers)
            if theirs is None:
                problems.append(f"{spot}, which is in no component of the layer table")
            elif theirs == "":
                if own in independent:
                    problems.append(f"{spot}: {own} must import nothing else of ours")
            elif theirs not in reach[own]:
                problems.append(f"{spot}: {own} does not build on {theirs}")
            if imp.in_function and (module, imp.target) not in lazy:
                problems.append(f"{spot} inside a function: move it to the top, or list it in LAZY")
    return problems


def test_the_sources_keep_the_layers() -> None:
    problems = violations(SRC)
    assert not problems, "\n".join(problems)


def test_every_lazy_import_listed_is_still_there() -> None:
    """A stale LAZY entry would let a new function-level import slip in later."""
    present = {
        (imp.module, imp.target)
        for path in SRC.rglob("*.py")
        for imp in imports_of(path, SRC)
        if imp.in_function
    }
    assert sorted(set(LAZY) - present) == []


def test_dicomnet_is_independent() -> None:
    """The network package imports nothing else of ours: the table says so, and each
    of its modules' imports (in functions too) stays inside it."""
    assert LAYERS["dicomnet"] == frozenset() and "dicomnet" in INDEPENDENT
    modules = sorted((SRC / "dicomnet").rglob("*.py"))
    assert len(modules) >= 8
    for path in modules:
        assert all(imp.target.startswith("dicomrouter.dicomnet") for imp in imports_of(path, SRC))


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "dicomrouter"
    for name, text in {"__init__.py": "", **files}.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return src


def test_the_checker_catches_what_the_layers_forbid(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "dicomnet/__init__.py": "",
            "dicomnet/pdu.py": "from dicomrouter.store import index\n",
            "dicomnet/version.py": "from dicomrouter import __version__\n",
            "store/__init__.py": "",
            "store/index.py": "def f():\n    from dicomrouter.control import jobs\n",
            "control/__init__.py": "",
            "control/jobs.py": "from ..store import index\nfrom . import jobs as again\n",
            "rules/__init__.py": "import dicomrouter.config\n",
            "config/__init__.py": "",
            "stray.py": "",
        },
    )
    found = violations(src)
    expected = [
        "dicomrouter/dicomnet/pdu.py:1: dicomrouter.dicomnet.pdu imports "
        "dicomrouter.store.index: dicomnet does not build on store",
        "dicomrouter/dicomnet/version.py:1: dicomrouter.dicomnet.version imports "
        "dicomrouter: dicomnet must import nothing else of ours",
        "dicomrouter/rules/__init__.py:1: dicomrouter.rules imports dicomrouter.config: "
        "rules does not build on config",
        "dicomrouter/store/index.py:2: dicomrouter.store.index imports "
        "dicomrouter.control.jobs: store does not build on control",
        "dicomrouter/store/index.py:2: dicomrouter.store.index imports "
        "dicomrouter.control.jobs inside a function: move it to the top, or list it in LAZY",
        "dicomrouter/stray.py:1: dicomrouter.stray is in no component of the layer table",
    ]
    assert found == expected


def test_the_checker_accepts_allowed_and_listed_imports(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "store/__init__.py": "from dicomrouter import __version__\n",
            "control/__init__.py": "def f():\n    from dicomrouter import store\n",
            "api/__init__.py": "from dicomrouter.config import x\nfrom dicomrouter.web import y\n",
        },
    )
    lazy = {("dicomrouter.control", "dicomrouter.store"): "for the test"}
    assert violations(src, lazy=lazy) == []
    assert violations(src, lazy={}) == [
        "dicomrouter/control/__init__.py:2: dicomrouter.control imports dicomrouter.store "
        "inside a function: move it to the top, or list it in LAZY"
    ]


def test_the_table_has_no_cycle() -> None:
    below(LAYERS)
    with pytest.raises(ValueError, match="cycle: a -> b -> a"):
        below({"a": frozenset({"b"}), "b": frozenset({"a"})})


def test_the_architecture_document_shows_this_table() -> None:
    """docs/architecture.md, *Layers*: one row per component, ``| `name` | `dep`, ... |``."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.fullmatch(r"\| `([\w.]+)` \| (.*?) \|.*", line)
        if match:
            rows[match.group(1)] = frozenset(re.findall(r"`([\w.]+)`", match.group(2)))
    assert rows == dict(LAYERS)
