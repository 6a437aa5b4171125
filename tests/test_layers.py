"""The house shows its floors: no module imports a floor above its own, at
the top of the file or late inside a function, and none reaches up for an
object of a higher floor by name (``getattr(x, "unit")``, ``.unit.``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastfc"

# floor of each module or folder (by dotted name); the longest prefix wins
FLOORS = {
    "fastfc._core": 1, "fastfc.errors": 1, "fastfc.names": 1, "fastfc._optional": 1,
    "fastfc._numbers": 1,
    "fastfc.storage": 2, "fastfc.faults": 2,
    "fastfc.copyservices.flashcopy": 3, "fastfc.copyservices.pprc": 3,
    "fastfc.copyservices": 4,
    "fastfc.durable": 5,
    "fastfc.tools": 6, "fastfc.__main__": 6,
    # secondary units served to a session in another process (Ray actors and
    # their in-process double): a server over durable units, on the tools
    # floor; the session reaches them through fastfc.storage.site (floor 2)
    "fastfc.remote": 6,
}
# reaching up by attribute: names of what only a higher floor holds
UPWARD_ATTRIBUTES = {"unit": 5, "_register_session": 5, "_forget_session": 5}


def floor_of(module: str) -> int | None:
    best = None
    for prefix, floor in FLOORS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, floor)
    return None if best is None else best[1]


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        if name == "fastfc":
            continue          # the package's front door re-exports every floor
        yield name, path


def imported(tree: ast.AST, module: str):
    """(line, dotted name) of everything ``tree`` imports from fastfc."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")[: -node.level] if not module.endswith("__init__") \
                    else module.split(".")
                base = ".".join(pkg + ([base] if base else []))
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}" if base else alias.name


@pytest.mark.parametrize("module,path", list(modules()), ids=lambda x: str(x))
def test_no_module_reaches_a_floor_above_its_own(module, path):
    own = floor_of(module)
    assert own is not None, f"{module} stands on no floor: add it to FLOORS"
    tree = ast.parse(path.read_text())
    wrong = []
    for line, name in imported(tree, module):
        if not name.startswith("fastfc"):
            continue
        # "from fastfc import faults" names a module; "from fastfc.x import y" a name in x
        target = floor_of(name) or floor_of(name.rsplit(".", 1)[0])
        if target is not None and target > own:
            wrong.append(f"line {line}: imports {name} (floor {target})")
    for node in ast.walk(tree):
        attr = None
        if isinstance(node, ast.Attribute):
            attr = node.attr
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
            attr = node.args[1].value
        if attr in UPWARD_ATTRIBUTES and UPWARD_ATTRIBUTES[attr] > own:
            wrong.append(f"line {node.lineno}: reaches up for .{attr} (floor "
                         f"{UPWARD_ATTRIBUTES[attr]})")
    assert not wrong, f"{module} (floor {own}):\n" + "\n".join(wrong)


def test_remote_reaches_no_private_of_the_floors_below():
    """fastfc.remote (a server over durable units and its transports) uses
    the public calls of units, volumes and relationships: every ``._name``
    it reads or sets is one of its own (defined in fastfc/remote), never a
    private of a unit, volume or relationship (``unit._volumes``,
    ``b._secondary``, ``fc._resync``, ``unit._closed``, ...)."""
    files = sorted((PACKAGE / "remote").glob("*.py"))
    trees = {path: ast.parse(path.read_text()) for path in files}
    own: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                    and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                own.add(node.attr)
    wrong = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None)
                  in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
                  and isinstance(node.args[1], ast.Constant)):
                name = node.args[1].value
            if isinstance(name, str) and name.startswith("_") and not name.startswith("__") \
                    and name not in own:
                wrong.append(f"{path.name}:{node.lineno}: .{name}")
    assert not wrong, "fastfc.remote reaches into privates below it:\n" + "\n".join(wrong)
