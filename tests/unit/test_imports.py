"""The package's import graph runs one way (docs/architecture.md, "Layers").

Every module of kallichore_trio is parsed with `ast` (nothing is imported), and every import in
it becomes an edge: module-level imports, imports inside functions (they run too, only later),
and imports under `if TYPE_CHECKING:`. Type-only imports count because the layering is about
what a module knows, not about what happens to load: a module that names an upper layer's
class in its annotations depends on that layer as much as one that calls it, and the one-way
rule says such knowledge goes upward only through narrow protocols, never through imports.

`from package import name` is an edge to `package.name` when that is a module, else to
`package`. Importing `a.b.c` also runs `a/__init__` and `a/b/__init__`; those implicit edges are
not counted (a package's `__init__` re-exporting its own modules would otherwise be a cycle
with each of them).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

import kallichore_trio

PACKAGE = "kallichore_trio"
ROOT = Path(kallichore_trio.__file__).parent

#: Modules allowed past MAX_LINES, and why. An entry for a module that no longer exists or has
#: shrunk fails the test, so the list cannot outlive its reasons.
MAX_LINES = 500
LONG_MODULES = {
    "kallichore_trio.client.session": (
        "one kernel session seen from the client: the channel reader that routes every "
        "message to its request, execution, streaming, input answers, comms and events share "
        "the reader's routing tables; to be split along those lines"
    ),
    "kallichore_trio.transport.zmq_trio": (
        "one adapter: TrioSocket, Subscription and round_trip share the rule that EVENTS is "
        "re-read after every zmq call and the FD is waited on only when nothing is pending; "
        "split up, that reasoning would be spread over modules that must change together"
    ),
    "kallichore_trio.kernel.kernel": (
        "one incarnation: its run task, pumps, heartbeat, output readers and stop share the "
        "sockets and the one Lifecycle; startup (startup.py), launching (launch.py) and the "
        "parameters (params.py) are already out, and what is left changes together"
    ),
    "kallichore_trio.session.session": (
        "the lifecycle of a session (start with its port retries, restart, adopt, interrupt, "
        "kill, shutdown) and the KernelEvents it implements; the client channel, the HTTP view, "
        "the working directory and the message-path decisions are already out (client.py, "
        "view.py, workdir.py, core/relay.py)"
    ),
}

#: Type-only imports that close a cycle, and why they are still here. Stale entries fail.
TYPE_ONLY_BACK_EDGES: dict[tuple[str, str], str] = {
    ("kallichore_trio.client.session", "kallichore_trio.client.aclient"): (
        "an AsyncSession is a child of its AsyncClient (it runs in the client's nursery and "
        "calls the client's routes for interrupt, restart, kill, delete); at run time only "
        "aclient imports session"
    ),
}

#: Libraries that do I/O or run an event loop: pure layers must not import them.
IO_LIBRARIES = ("trio", "zmq", "quart", "quart_trio", "hypercorn")


@attrs.frozen
class Edge:
    importer: str
    imported: str
    type_only: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement, anywhere in the module, and whether it is type-only."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, type_only))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(tree, False)
    return found


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module a `from ... import` names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    """Every module (ours or a library's top-level name) that `name` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    edges = []
    for node, type_only in _imports(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            source = _resolve(node, name, path.name == "__init__.py")
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules
                       else source for alias in node.names]
        for target in targets:
            if not target.startswith(PACKAGE + ".") and target != PACKAGE:
                target = target.split(".")[0]  # a library: its top-level name is enough
            edges.append(Edge(name, target, type_only))
    return edges


def import_graph() -> list[Edge]:
    modules = all_modules()
    return [edge for name, path in modules.items() for edge in imports_of(name, path, modules)]


def find_cycle(edges: list[Edge]) -> list[str] | None:
    """One cycle among the package's modules, as a path that ends where it starts."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if edge.imported.startswith(PACKAGE):
            graph.setdefault(edge.importer, set()).add(edge.imported)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def _in(module: str, *layers: str) -> bool:
    return any(module == f"{PACKAGE}.{layer}" or module.startswith(f"{PACKAGE}.{layer}.")
               for layer in layers)


def _violations(edges: list[Edge], importers: tuple[str, ...],
                forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{edge.importer} imports {edge.imported}" + (" (type-only)" if edge.type_only else "")
        for edge in edges
        if _in(edge.importer, *importers)
        and (_in(edge.imported, *forbidden) or edge.imported in forbidden)
    )


# ---- the checker checks what it should ------------------------------------------------------


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    source = (
        "from __future__ import annotations\n"
        "import trio\n"
        "from typing import TYPE_CHECKING\n"
        "from kallichore_trio.transport import unix\n"
        "from kallichore_trio.config import Config\n"
        "from . import registry\n"
        "if TYPE_CHECKING:\n"
        "    from kallichore_trio.daemon import Daemon\n"
        "def late():\n"
        "    import zmq.asyncio\n"
    )
    path = tmp_path / "probe.py"
    path.write_text(source)
    edges = set(imports_of("kallichore_trio.probe", path, all_modules()))
    name = "kallichore_trio.probe"
    assert edges == {
        Edge(name, "__future__", False),
        Edge(name, "trio", False),
        Edge(name, "typing", False),
        Edge(name, "kallichore_trio.transport.unix", False),
        Edge(name, "kallichore_trio.config", False),
        Edge(name, "kallichore_trio.registry", False),
        Edge(name, "kallichore_trio.daemon", True),
        Edge(name, "zmq", False),
    }


@pytest.mark.parametrize(
    ("edges", "cycle"),
    [
        pytest.param([("a", "b"), ("b", "c")], None, id="a chain"),
        pytest.param([("a", "b"), ("b", "a")], ["a", "b", "a"], id="two modules"),
        pytest.param([("a", "b"), ("b", "c"), ("c", "b")], ["b", "c", "b"], id="further down"),
        pytest.param([("a", "a")], ["a", "a"], id="itself"),
        pytest.param([("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")], None, id="a diamond"),
    ],
)
def test_find_cycle(edges: list[tuple[str, str]], cycle: list[str] | None) -> None:
    def ours(name: str) -> str:
        return f"{PACKAGE}.{name}"

    found = find_cycle([Edge(ours(a), ours(b), False) for a, b in edges])
    assert found == (None if cycle is None else [ours(name) for name in cycle])


# ---- the package --------------------------------------------------------------------------


def test_no_import_cycle() -> None:
    edges = [edge for edge in import_graph()
             if (edge.importer, edge.imported) not in TYPE_ONLY_BACK_EDGES]
    assert find_cycle(edges) is None


def test_the_allowed_back_edges_still_exist_and_are_type_only() -> None:
    edges = {(edge.importer, edge.imported): edge for edge in import_graph()}
    for pair, reason in TYPE_ONLY_BACK_EDGES.items():
        assert pair in edges, f"{pair} is gone: remove it from TYPE_ONLY_BACK_EDGES ({reason})"
        assert edges[pair].type_only, f"{pair} is a run-time import now"


def test_pure_layers_import_no_io_library() -> None:
    assert _violations(import_graph(), ("wire", "core"), IO_LIBRARIES) == []


def test_transport_knows_no_session_api_or_daemon() -> None:
    assert _violations(import_graph(), ("transport",),
                       ("session", "kernel", "api", "daemon", "registry", "app", "cli")) == []


def test_the_daemon_and_below_know_no_front_end() -> None:
    assert _violations(import_graph(), ("daemon", "registry", "session", "kernel", "core"),
                       ("api", "app", "cli")) == []


def test_only_the_command_line_knows_the_composition_root() -> None:
    assert _violations(import_graph(), ("api", "daemon", "registry", "session", "kernel",
                                        "core", "transport", "wire"), ("app", "cli")) == []


def test_no_module_is_too_long() -> None:
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines())
               for name, path in all_modules().items()}
    too_long = {name: n for name, n in lengths.items()
                if n > MAX_LINES and name not in LONG_MODULES}
    assert too_long == {}, f"split these, or add them to LONG_MODULES with a reason: {too_long}"
    stale = {name for name in LONG_MODULES if lengths.get(name, 0) <= MAX_LINES}
    assert stale == set(), f"no longer over {MAX_LINES} lines (or gone): remove from LONG_MODULES"


#: What the MCP SDK brings: a daemon loads them at its first MCP workspace, not at start.
MCP_SDK_MODULES = ("mcp", "pydantic", "pydantic_core", "starlette", "sse_starlette")


def test_the_daemon_loads_the_mcp_sdk_only_when_a_workspace_needs_it() -> None:
    """In a fresh interpreter (this one has the tests' imports): the command line and the
    composition root, and McpService itself, import none of the SDK."""
    probe = (
        "import json, sys\n"
        "import kallichore_trio.app, kallichore_trio.cli, kallichore_trio.mcp.service\n"
        f"print(json.dumps([m for m in {MCP_SDK_MODULES!r} if m in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=True)
    assert json.loads(done.stdout) == []
