"""The layers of docs/architecture.md hold in the code: every import (function-local ones included) goes to a
lower floor or stays inside its own package, packages have no import circles, and the README's module table
names exactly the modules in the tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "stillroom"


def floors() -> dict[str, int]:
    """``unit -> floor`` from the table of docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    return {unit: int(floor) for floor, unit in re.findall(r"^\| (\d) \| `(\w+)` \|", text, flags=re.M)}


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The stillroom modules ``path`` imports (``from stillroom import x`` counts as ``stillroom.x`` when that is
    a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "stillroom":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "stillroom"}
    return {m for m in found if m in known}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "stillroom"


def test_every_unit_of_the_tree_has_a_floor():
    table = floors()
    units = {unit(m) for m in modules()} - {"stillroom"}
    assert units == set(table), (sorted(units - set(table)), sorted(set(table) - units))


def test_imports_only_go_down_or_stay_inside_their_package():
    table, mods = floors(), modules()
    wrong = []
    for name, path in mods.items():
        if name == "stillroom":
            continue  # the public face only names modules (lazily), it imports nothing of them
        for dep in imports(path, set(mods)):
            a, b = unit(name), unit(dep)
            if b == "stillroom" or a == b:
                continue
            if table[b] >= table[a]:
                wrong.append(f"{name} (floor {table[a]}) imports {dep} (floor {table[b]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    mods = modules()
    graph = {m: imports(p, set(mods)) - {m} for m, p in mods.items()}
    graph = {m: {d for d in deps if d != "stillroom" and not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]) if d in stack else f"{m} -> {d}")
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_readme_module_table_matches_the_tree():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `(stillroom(?:\.\w+)*)` \|", text, flags=re.M))
    mods = set(modules())
    packages_listed_whole = {"stillroom.losses", "stillroom.cli"}  # one row each: plain functions, verbs
    expected = {m for m in mods if not any(m.startswith(p + ".") for p in packages_listed_whole)}
    expected -= {"stillroom.__main__", "stillroom.tokenization", "stillroom.models", "stillroom.inputs",
                 "stillroom.teachers", "stillroom.generation", "stillroom.training"}  # packages: their modules are rows
    assert listed == expected, (sorted(expected - listed), sorted(listed - expected))


def test_each_shared_rule_has_one_definition():
    """The rules docs/architecture.md gives one home each are defined there and nowhere else."""
    source = {m: p.read_text(encoding="utf-8") for m, p in modules().items()}
    for pattern, home in ((r"pad_token_id if", None), (r"def pad_id\(", "stillroom.tokenization.special"),
                          (r"def model_context\(", "stillroom.models.loading"),
                          (r"os\.replace\(", None), (r"def atomic_write\(", "stillroom.files"),
                          (r"STILLROOM_CACHE\"\)", "stillroom.files"), (r"rp\.Progress\(|\bProgress\(", "stillroom.progress")):
        where = sorted(m for m, text in source.items() if re.search(pattern, text))
        if home is None:
            continue
        assert where == [home], (pattern, where)
    # renames into place happen in the one atomic write, and for whole folders (converted models)
    renames = sorted(m for m, text in source.items() if "os.replace(" in text)
    assert renames == ["stillroom.files", "stillroom.models.loading"], renames
