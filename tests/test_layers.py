"""The house shows its floors: no module imports a floor above its own, at
the top of the file or late inside a function, and none reaches up for an
object of a higher floor by name (``getattr(x, "unit")``, ``.unit.``), and
none reaches into another floor's privates (``volume._mirror`` from a Global
Mirror module: see the rules above ``private_reaches``)."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastfc"

# floor of each module or folder (by dotted name); the longest prefix wins
FLOORS = {
    "fastfc._core": 1, "fastfc.errors": 1, "fastfc.names": 1, "fastfc._optional": 1,
    "fastfc._numbers": 1,
    "fastfc.storage": 2, "fastfc.faults": 2,
    "fastfc.copyservices.flashcopy": 3, "fastfc.copyservices.pprc": 3,
    "fastfc.copyservices.sitepair": 3, "fastfc.copyservices.points": 3,
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


# --------------------------------------------------------------------------
# No reach into another floor's privates
# --------------------------------------------------------------------------
#
# ``x._name`` (``x`` not ``self`` or ``cls``, ``_name`` not a dunder) is a
# reach into a private when a class of the package defines ``_name``: a
# method ``def _name``, a class attribute ``_name = ...``, ``self._name = ...``
# in a method, or a field or ``def`` of a ``cdef class`` in the core's
# ``.pyx``/``.pxi``/``.pxd`` files. A reach is wrong when the class that
# defines the name stands on another floor than the module that reaches:
# what one floor uses of another is public.
#
# The core's protocol. The volume, FlashCopy and PPRC classes (floors 2 and 3)
# subclass the core's ``cdef`` bases (``VolumeBase``, ``RelationshipBase``,
# ``MirrorBase``) and cooperate with the C I/O path through their fields
# (``_src_rels``, ``_tgt_rel``, ``_mirror``, ``_lock`` ...). Those privates
# are the core's protocol for floors 2 and 3 only. Floors 4 and up are
# clients of the volumes and relationships: they use what floors 2 and 3 make
# public, never the protocol underneath. Every other private is its floor's
# own.
#
# Which class an ``x`` is, the check cannot always tell; it takes ``x._name``
# as the module's own when
#   - ``x`` is a parameter annotated with a class of the module's floor
#     that defines ``_name``, or
#   - the method that reaches belongs to a class that defines ``_name``
#     itself (another instance of the same class), or
#   - a class of the same module defines ``_name`` (a module's classes share
#     their privates);
# the last two not for the core's protocol names on floors 4 and up, where a
# reach for a volume's ``_lock`` must not hide behind a lock of the module's
# own.
# Otherwise the reach counts against every other floor that defines the name.
# Private module-level names (``from fastfc.x import _y``, ``x._y``) of
# another floor are reaches too.

CORE = "fastfc._core"
CORE_PROTOCOL_FLOORS = {2, 3}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def core_sources():
    """The core's Cython files (one ``.pyx``, its ``.pxi`` and ``.pxd`` parts)."""
    return sorted(p for ext in ("pyx", "pxi", "pxd") for p in PACKAGE.rglob(f"*.{ext}"))


def core_privates() -> dict[str, set[str]]:
    """Private fields and methods of the core's ``cdef`` classes: name -> classes.

    A plain line reader, not a Cython parser: ``cdef class Name(...):`` opens a
    class, a line at the left margin closes it; inside, ``cdef [public|readonly]
    type _name`` declares a field and ``def``/``cpdef``/``cdef`` ``_name(`` a method.
    """
    import re

    found: dict[str, set[str]] = {}
    field = re.compile(r"\s+cdef\s+(?!class\b)(?:(?:public|readonly)\s+)?"
                       r"[\w.\[\]:, *]+?\s\**(\w+)\s*(?:#.*)?$")
    method = re.compile(r"\s+(?:c?p?def)\s+(?:[\w.\[\]:, *]+\s+)?\**(\w+)\s*\(")
    for path in core_sources():
        cls = None
        for line in path.read_text().splitlines():
            head = re.match(r"(?:cdef\s+)?class\s+(\w+)\b[^:]*:", line)
            if head:
                cls = head.group(1)
                continue
            if line.strip() and not line[0].isspace() and not line.startswith("#"):
                cls = None
            if cls is None or not line.startswith("    ") or line.startswith("     "):
                continue
            m = method.match(line) or field.match(line)
            if m and is_private(m.group(1)):
                found.setdefault(m.group(1), set()).add(cls)
    return found


class ModuleInfo:
    """A parsed module: its floor, tree, and the privates its classes define."""

    def __init__(self, module: str, path: Path, source: str | None = None):
        self.module, self.path = module, path
        self.floor = floor_of(module)
        self.tree = ast.parse(path.read_text() if source is None else source)
        self.classes: dict[str, set[str]] = {}     # class -> private names it defines
        self.functions: set[str] = set()           # private module-level names
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if is_private(node.name):
                    self.functions.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                self.functions.update(t.id for t in targets
                                      if isinstance(t, ast.Name) and is_private(t.id))
        for cls in ast.walk(self.tree):
            if isinstance(cls, ast.ClassDef):
                self.classes[cls.name] = class_privates(cls)


def class_privates(cls: ast.ClassDef) -> set[str]:
    names = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and is_private(node.name):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name) and is_private(t.id):
                    names.add(t.id)
                if isinstance(t, ast.Name) and t.id == "__slots__":
                    names.update(e.value for e in ast.walk(node.value)
                                 if isinstance(e, ast.Constant) and isinstance(e.value, str)
                                 and is_private(e.value))
    for fn in cls.body:
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for n in ast.walk(fn):
                if (isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
                        and isinstance(n.value, ast.Name) and n.value.id == "self"
                        and is_private(n.attr)):
                    names.add(n.attr)
    return names


def package():
    return {m: ModuleInfo(m, p) for m, p in modules()}


def private_definitions(infos) -> dict[str, dict[int, set[str]]]:
    """private name -> floor -> the classes (``module.Class``) that define it."""
    defs: dict[str, dict[int, set[str]]] = {}
    for info in infos.values():
        for cls, names in info.classes.items():
            for name in names:
                defs.setdefault(name, {}).setdefault(info.floor, set()).add(f"{info.module}.{cls}")
    for name, classes in core_privates().items():
        defs.setdefault(name, {}).setdefault(floor_of(CORE), set()).update(
            f"{CORE}.{c}" for c in classes)
    return defs


def _annotation_names(node) -> set[str]:
    """The class names an annotation mentions (``"StorageUnit"``, ``Volume | None``)."""
    if node is None:
        return set()
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        try:
            node = ast.parse(node.value, mode="eval").body
        except SyntaxError:
            return set()
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | \
           {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def private_reaches(info: ModuleInfo, infos, defs) -> list[tuple[int, str, str]]:
    """Every reach of ``info``'s module into another floor's privates, as
    ``(line, "x._name", "floor G: the classes that define it")``."""
    own = info.floor
    core_floor = floor_of(CORE)
    core_names = {name for name, floors in defs.items() if core_floor in floors
                  and any(c.startswith(CORE + ".") for c in floors[core_floor])}
    own_module = set().union(*info.classes.values()) if info.classes else set()
    class_floor = {cls: i.floor for i in infos.values() for cls in i.classes}
    class_names = {cls: names for i in infos.values() for cls, names in i.classes.items()}
    wrong = []

    def reach(node, where_floors):
        where = "; ".join(f"floor {floor}: {', '.join(sorted(where_floors[floor]))}"
                          for floor in sorted(where_floors))
        wrong.append((node.lineno, ast.unparse(node), where))

    def visit(node, cls, params):
        if isinstance(node, ast.ClassDef):
            cls = node.name
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            params = dict(params)
            for a in args.posonlyargs + args.args + args.kwonlyargs:
                params[a.arg] = _annotation_names(a.annotation)
        if (isinstance(node, ast.Attribute) and is_private(node.attr)
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            name = node.attr
            others = {f: c for f, c in defs.get(name, {}).items() if f != own}
            if own in CORE_PROTOCOL_FLOORS and name in core_names:
                others = {}      # the core's protocol, for the floors that subclass its bases
            # (on floors 4 and up a name of the core's protocol is taken as
            # the core's, even where a class of the module has one of its own)
            protocol = own not in CORE_PROTOCOL_FLOORS and name in core_names
            if others and isinstance(node.value, ast.Name) and any(
                    class_floor.get(c) == own and name in class_names.get(c, ())
                    for c in params.get(node.value.id, ())):
                others = {}      # a parameter annotated with a class of this floor
            if others and not protocol and cls is not None and name in info.classes.get(cls, ()):
                others = {}      # another instance of the reaching class
            if others and not protocol and name in own_module:
                others = {}      # a private of the module's own classes
            if others:
                reach(node, others)
            elif isinstance(node.value, ast.Name):
                # a private module-level name of another floor's module
                target = next((m for m in infos if m.rsplit(".", 1)[-1] == node.value.id
                               and name in infos[m].functions), None)
                if target is not None and infos[target].floor != own:
                    reach(node, {infos[target].floor: {target}})
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastfc"):
            for alias in node.names:
                floor = floor_of(node.module)
                if is_private(alias.name) and f"{node.module}.{alias.name}" not in infos \
                        and floor is not None and floor != own \
                        and not (node.module == CORE and own in CORE_PROTOCOL_FLOORS):
                    wrong.append((node.lineno, f"import {node.module}.{alias.name}",
                                  f"floor {floor}: {node.module}"))
        for child in ast.iter_child_nodes(node):
            visit(child, cls, params)

    visit(info.tree, None, {})
    return sorted(set(wrong))


_PACKAGE = None


def _parsed():
    global _PACKAGE
    if _PACKAGE is None:
        infos = package()
        _PACKAGE = infos, private_definitions(infos)
    return _PACKAGE


def test_the_core_privates_are_found():
    """The line reader finds the core's protocol (so the check below is not
    vacuous if the core's files are split or renamed)."""
    found = core_privates()
    for name in ("_src_rels", "_tgt_rel", "_mirror", "_secondary", "_lock", "_unlock",
                 "_copy_chunk", "_collide"):
        assert name in found, f"{name} not found in {[p.name for p in core_sources()]}"


def test_a_reach_into_another_floors_privates_is_caught():
    """The check on made-up modules: what it must flag, and what it must not."""
    infos, defs = _parsed()

    def reaches(module, source):
        info = ModuleInfo(module, PACKAGE / "made_up.py", textwrap.dedent(source))
        return {expr for _, expr, _ in private_reaches(info, infos, defs)}

    tool = """
        from fastfc.durable.unit import StorageUnit
        def look(unit: StorageUnit, vol, fc, pair):
            unit._closed = True           # a storage unit's private (floor 5)
            vol._mirror, vol._lock()      # the core's protocol (floor 1)
            fc._resync                    # FlashCopy's private (floor 3)
            return vol.__class__, unit.name, vol.mirror
        class Holder:
            def __init__(self):
                self._kept = 1
                self._lock = None
            def same(self, other: "Holder"):
                return other._kept        # another instance of its own class
            def hold(self, volume):
                volume._lock()            # the core's, though Holder has a _lock too
        """
    assert reaches("fastfc.tools.made_up", tool) == {
        "unit._closed", "vol._mirror", "vol._lock", "fc._resync", "volume._lock"}
    # the core's protocol is open to the floors that subclass its bases
    engine = "def link(volume, rel):\n    volume._src_rels.append(rel); volume._lock()\n"
    assert reaches("fastfc.storage.made_up", engine) == set()
    assert reaches("fastfc.copyservices.made_up", engine) == {
        "volume._src_rels", "volume._lock"}
    # a parameter annotated with a class of the module's own floor
    own = "def f(unit: 'StorageUnit'):\n    unit._require_writable()\n"
    assert reaches("fastfc.durable.made_up", own) == set()
    assert reaches("fastfc.tools.made_up", own) == {"unit._require_writable"}


@pytest.mark.parametrize("module,path", list(modules()), ids=lambda x: str(x))
def test_no_module_reaches_into_another_floors_privates(module, path):
    infos, defs = _parsed()
    info = infos[module]
    wrong = private_reaches(info, infos, defs)
    report = (f"{module} (floor {info.floor}) uses privates of another floor (make what "
              "it needs public there):\n" + "\n".join(f"line {line}: {expr} ({where})"
                                                      for line, expr, where in wrong))
    assert not wrong, report


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


def type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines of the imports under ``if TYPE_CHECKING:`` (never run)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                for sub in ast.walk(inner):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        lines.add(sub.lineno)
    return lines


def import_graph() -> dict[str, set[str]]:
    """Module -> the fastfc modules it imports when it runs, at the top of
    the file or late inside a function (``from fastfc.x import y`` names
    module ``fastfc.x.y`` when there is one, else ``fastfc.x``); imports for
    type checkers alone do not count. The package's front door (``fastfc``)
    is left out: it re-exports every floor."""
    mods = {name: path for name, path in modules()}
    known = set(mods) | {"fastfc._core"}
    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        deps = set()
        tree = ast.parse(path.read_text())
        skip = type_checking_lines(tree)
        for line, name in imported(tree, module):
            if not name.startswith("fastfc.") or line in skip:
                continue
            target = name if name in known else name.rsplit(".", 1)[0]
            if target in known and target != module:
                deps.add(target)
        graph[module] = deps
    return graph


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, the first repeated last), or None."""
    state: dict[str, int] = {}     # 1 on the path, 2 done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_modules_import_each_other():
    """The import graph of fastfc's modules, top-level and function-level
    imports alike, has no cycle: no two modules import each other, directly
    or through others."""
    found = cycle_in(import_graph())
    assert found is None, "import cycle: " + " -> ".join(found)


def test_the_cycle_check_finds_a_cycle():
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set()}) is None
