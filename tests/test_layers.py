"""The package's dependencies point one way: no import cycles, and no upward imports between
its layers (backends below methods, methods below the runtime that runs them, the runtime
below eval / server / the CLI)."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent / "src" / "powersmc"

# the command line's modules
CLI = ("powersmc.cli", "powersmc.cli_parser", "powersmc.cli_commands")
# package prefix -> the prefixes its modules must not reach, directly or through others
FORBIDDEN = {
    "powersmc.backends": ("powersmc.methods", "powersmc.runtime", "powersmc.eval",
                          "powersmc.server", *CLI, "powersmc.bench"),
    "powersmc.methods": ("powersmc.runtime", "powersmc.eval", "powersmc.server", *CLI,
                         "powersmc.bench"),
    "powersmc.runtime": ("powersmc.eval", "powersmc.server", *CLI, "powersmc.bench"),
}


def _module_name(path: Path) -> str:
    name = ".".join(("powersmc", *path.relative_to(ROOT).with_suffix("").parts))
    return name.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its text (lazy imports inside
    functions included). `from pkg import mod` counts as importing `pkg.mod` when that is a
    module; `powersmc` itself (its __init__ re-exports the methods) counts as `powersmc`."""
    paths = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {}
    for path in paths:
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and (
                    node.module == "powersmc" or node.module.startswith("powersmc.")):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names
                         if a.name == "powersmc" or a.name.startswith("powersmc.")}
        graph[_module_name(path)] = deps - {_module_name(path)}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module `start` reaches, with one import chain to it."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop()
        for dep in sorted(graph.get(node, ())):
            if dep not in paths:
                paths[dep] = [*paths[node], dep]
                todo.append(dep)
    return paths


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """One line per module of a lower layer that reaches a module of a forbidden one."""

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    found = []
    for node in sorted(graph):
        for layer, banned in FORBIDDEN.items():
            if not under(node, layer):
                continue
            for dep, chain in sorted(reachable(graph, node).items()):
                if any(under(dep, b) for b in banned):
                    found.append(" -> ".join(chain))
    return found


def test_package_imports_have_no_cycle():
    """No module of the package imports (even lazily, inside a function) a module that imports
    it back, directly or through others."""
    graph = import_graph()
    graph.pop("powersmc")  # the public facade: it imports the layers, none imports it
    state = {}

    def visit(node, stack):
        if state.get(node) == "done" or node not in graph:
            return
        assert state.get(node) != "open", "import cycle: " + " -> ".join([*stack, node])
        state[node] = "open"
        for dep in sorted(graph[node]):
            visit(dep, [*stack, node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])
    assert "powersmc.eval.data" in graph["powersmc.eval.runner"]


def test_layers_import_only_downward():
    """backends/ reaches nothing above it; methods/ nothing of runtime/, eval/, server/,
    bench/ or the CLI; runtime/ nothing of eval/, server/, bench/ or the CLI (even lazily,
    even through other modules)."""
    graph = import_graph()
    assert upward_imports(graph) == []
    # the graph sees what it must: a lazy import, an import through a package, the facade
    assert "powersmc.backends.vllm_particles" in graph["powersmc.backends.vllm_lm"]
    assert "powersmc.backends.vllm_processor" in graph["powersmc.backends.vllm_particles"]
    assert "powersmc.runtime.api" in graph["powersmc"]


def test_layer_check_catches_an_upward_import():
    graph = import_graph()
    graph["powersmc.backends.protocol"] = graph["powersmc.backends.protocol"] | {
        "powersmc.proposals"}
    graph["powersmc.proposals"] = graph["powersmc.proposals"] | {"powersmc"}
    found = upward_imports(graph)
    assert ("powersmc.backends.protocol -> powersmc.proposals -> powersmc -> "
            "powersmc.runtime.api -> powersmc.methods.bon") in found
    graph = import_graph()
    graph["powersmc.methods.common"] = graph["powersmc.methods.common"] | {"powersmc.cli"}
    assert any(line.startswith("powersmc.methods.common -> powersmc.cli")
               for line in upward_imports(graph))
    graph = import_graph()  # a method reaching the runtime that runs it
    graph["powersmc.methods.mh"] = graph["powersmc.methods.mh"] | {"powersmc.runtime.api"}
    assert "powersmc.methods.mh -> powersmc.runtime.api" in upward_imports(graph)


def test_the_single_process_server_does_not_import_ray():
    """`powersmc serve` without --replicas (and the CLI) never imports Ray."""
    import subprocess
    import sys

    code = ("import sys, powersmc.cli, powersmc.server.run, powersmc.server.app; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
