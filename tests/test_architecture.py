"""The library's shape, checked: no import cycle inside ``dymu_viz`` (module-level and
function-level imports alike), no private name imported across modules, and no VLM family
named in code outside its own module under ``vlm/families/``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dymu_viz"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """(imported dymu_viz module, names taken from it) for every import statement in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names if alias.name.startswith("dymu_viz")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("dymu_viz"):
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            out.append((target, [n for n in names if f"{target}.{n}" not in known]))
            out += [(m, []) for m in submodules]
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    edges: dict[str, set[str]] = {}
    for name, path in found.items():
        targets = set()
        for target, _ in imports(name, path, known):
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target != name and not name.startswith(target + "."):  # a package's own parents run first anyway
                targets.add(target)
        edges[name] = targets
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk meets (each as its nodes in order, first repeated last)."""
    state: dict[str, int] = {}  # 1: on the walk's stack, 2: done
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycle_inside_the_package() -> None:
    cycles = find_cycles(graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle() -> None:
    """The checker itself: a cycle is reported (so an empty report means something), and the
    graph holds the imports it should."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert "dymu_viz.vlm.family" in graph()["dymu_viz.vlm.families.llava"]


def test_no_private_name_is_imported_across_modules() -> None:
    known = set(modules())
    offenders = [f"{name}: {target}.{n}" for name, path in modules().items()
                 for target, names in imports(name, path, known) for n in names if n.startswith("_")]
    assert not offenders, offenders


FAMILY_NAMES = re.compile(r"Qwen|Onevision|Llava")
FAMILY_HOMES = ("dymu_viz.vlm.families",)


def code_mentions(path: Path) -> list[str]:
    """Identifiers, attribute names and string constants of a file that name a family, leaving
    out docstrings and comments."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        text = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else \
            node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
            else node.name if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else None
        if text and FAMILY_NAMES.search(text):
            found.append(f"{path.name}:{node.lineno}: {text[:60]!r}")
    return found


def test_no_family_is_named_outside_its_own_module() -> None:
    mentions = [m for name, path in modules().items()
                if name.startswith(("dymu_viz.vlm", "dymu_viz.vtu")) and not name.startswith(FAMILY_HOMES)
                for m in code_mentions(path)]
    assert not mentions, mentions
    assert code_mentions(PACKAGE / "vlm" / "families" / "llava.py")  # the check sees code that names one
