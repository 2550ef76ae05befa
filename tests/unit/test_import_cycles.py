"""No import cycle inside ``vmscope/``: the imports of every module, read
with ``ast`` (nothing is imported), form a graph with no strongly connected
component of more than one module.

Why: modules that import each other cannot be read, tested or moved alone
(the KVM debug target and machine did, and the arm64 pair). Every import
counts: inside functions (they run) and under ``if TYPE_CHECKING:`` (a
module that needs another's type to be understood depends on it).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "vmscope"

#: known cycles, each with why it stays or who removes it
ALLOWED = {
    # type-only: drgn-style helpers name the LinuxKernel they are handed
    # (under TYPE_CHECKING); the kernel object imports them to offer them
    frozenset({"vmscope.vmi.linux.clock", "vmscope.vmi.linux.current", "vmscope.vmi.linux.kernel",
               "vmscope.vmi.linux.modules", "vmscope.vmi.linux.printk", "vmscope.vmi.linux.tasks",
               "vmscope.vmi.linux.user"}),
    # type-only: a ProbeSet names the Inspector it serves (under TYPE_CHECKING);
    # the Inspector makes its ProbeSet on first use
    frozenset({"vmscope.client.probe", "vmscope.client.session"}),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(tree: ast.AST, package: str, modules: dict[str, Path]) -> set[str]:
    """Modules of vmscope that ``tree`` imports when it runs."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in modules:
                    found.add(full)  # from package import module
                elif base in modules:
                    found.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = _imports(ast.parse(path.read_text(), str(path)), package, modules) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(frozenset(component))
    return out


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [frozenset("abc")]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions_and_type_checking_blocks():
    graph = import_graph()
    assert "vmscope.kvm.x86.target" in graph["vmscope.kvm.x86.machine"]
    assert "vmscope.kvm.runcontrol" in graph["vmscope.kvm.x86.machine"]
    # vmscope.cli imports the back ends inside its commands
    assert "vmscope.kvm" in graph["vmscope.cli"]
    assert "vmscope.vmi.linux.kernel" in graph["vmscope.vmi.linux.tasks"]  # under TYPE_CHECKING


def test_no_import_cycle_inside_vmscope():
    found = [sorted(c) for c in cycles(import_graph()) if c not in ALLOWED]
    assert not found, f"import cycles: {found}"
