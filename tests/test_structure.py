"""Structure of common/: every module imports only modules below it (no import circle), counting the imports
made inside functions too, since a lazy import is still a dependency."""
import ast
from pathlib import Path

COMMON = Path(__file__).resolve().parent.parent / "common"


def import_graph() -> dict[str, set[str]]:
    """module -> the common/ modules it imports anywhere in its file (top level or inside functions)."""
    mods = {p.stem for p in COMMON.glob("*.py") if p.stem != "__init__"}
    graph = {m: set() for m in mods}
    for m in mods:
        for node in ast.walk(ast.parse((COMMON / f"{m}.py").read_text())):
            found = []
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:                    # from .x import y
                    found.append(node.module.split(".")[0])
                elif node.level == 1:                                  # from . import x, y
                    found += [a.name for a in node.names]
                elif node.module == "common":                          # from common import x
                    found += [a.name for a in node.names]
                elif node.module and node.module.startswith("common."):
                    found.append(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found += [a.name.split(".")[1] for a in node.names if a.name.startswith("common.")]
            graph[m] |= {f for f in found if f in mods and f != m}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                c = visit(n)
                if c:
                    return c
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            c = visit(m)
            if c:
                return c
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_common_has_no_import_circle():
    graph = import_graph()
    assert {"cli", "errors", "checkpoint", "dist", "nfm", "sae", "saelens"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle in common/: " + " -> ".join(cycle)
    assert graph["errors"] == set()                      # the bottom: raised everywhere, imports nothing
