"""The arrows allowed between rooms, checked on every module's imports (function-local ones included).

Rooms: planner, simulator, engine, validation (top-level folders) and the hall (``specplan/``: contracts, errors,
fmt, jsonio, catalog, trace, and the command line). validation -> planner, simulator, engine; simulator -> planner;
every room -> the hall's modules, never its command line (``specplan.commands``, ``specplan.cli``). Inside the engine:
build -> execute, io, model; execute -> io, model; measure -> io, model, execute; io -> model; model -> nothing. The contracts
import no room and no torch. ``bench/`` scripts import rooms, not command modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("planner", "simulator", "engine", "validation")
#: room -> the rooms it may import
ROOM_ARROWS = {"planner": set(), "simulator": {"planner"}, "engine": set(),
               "validation": {"planner", "simulator", "engine"}}
#: engine sub-folder -> the engine sub-folders it may import
ENGINE_ARROWS = {"model": set(), "io": {"model"}, "measure": {"io", "model", "execute"}, "execute": {"io", "model"},
                 "build": {"model", "execute", "io"}}
HALL = {"contracts", "errors", "fmt", "jsonio", "catalog", "trace", "profiles"}
COMMAND_LINE = {"commands", "cli"}
#: known violations, (module path, room imported); each must still occur (a stale entry fails)
ALLOWED: set[tuple[str, str]] = set()


def imported_modules(source: str) -> list[str]:
    """Every absolute module an import statement names, anywhere in the file (``from a import b`` gives ``a.b``
    too, as ``b`` may be a module)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names if a.name != "*"]
    return names


def place_of(module: str) -> tuple[str, str | None] | None:
    """(room or hall part, engine sub-folder) of a ``specplan`` module; None outside the project."""
    parts = module.split(".")
    if parts[0] != "specplan":
        return None
    if len(parts) == 1:
        return ("hall", None)
    if parts[1] in ROOMS:
        return (parts[1], parts[2] if parts[1] == "engine" and len(parts) > 2 else None)
    if parts[1] in COMMAND_LINE:
        return ("command line", None)
    return ("hall", None)


def violations(path: str, source: str) -> list[tuple[str, str]]:
    """(module path, what it must not import) for one file of a room (``path`` relative to the project)."""
    room, *rest = Path(path).parts
    sub = rest[0] if room == "engine" and len(rest) > 1 else None
    bad = []
    for module in imported_modules(source):
        place = place_of(module)
        if place is None or place[0] == room and (sub is None or place[1] in (None, sub)):
            continue
        target, target_sub = place
        if target == "command line":
            bad.append((path, module))
        elif target == room:
            if target_sub not in ENGINE_ARROWS[sub]:
                bad.append((path, f"engine.{target_sub}"))
        elif target in ROOMS and target not in ROOM_ARROWS[room]:
            bad.append((path, target))
    return sorted(set(bad))


def room_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for room in ROOMS for p in (ROOT / room).rglob("*.py"))


def read(path: str) -> str:
    return (ROOT / path).read_text(encoding="utf-8")


def test_every_room_has_modules():
    files = room_files()
    for room in ROOMS:
        assert any(f.startswith(f"{room}/") for f in files), room
    for sub in ENGINE_ARROWS:
        assert any(f.startswith(f"engine/{sub}/") for f in files), sub


def test_rooms_import_only_the_allowed_rooms():
    found = {v for path in room_files() for v in violations(path, read(path))}
    assert found - ALLOWED == set(), "imports against the arrows"
    assert ALLOWED - found == set(), "an allowed violation is gone: remove it from ALLOWED"


def test_contracts_import_no_room_and_no_torch():
    for p in sorted((ROOT / "specplan" / "contracts").glob("*.py")):
        for module in imported_modules(p.read_text(encoding="utf-8")):
            place = place_of(module)
            assert module.split(".")[0] != "torch", (p.name, module)
            assert place is None or place[0] == "hall" and not module.startswith("specplan.catalog"), (p.name, module)


def test_bench_imports_rooms_not_commands():
    for p in sorted((ROOT / "bench").glob("*.py")):
        for module in imported_modules(p.read_text(encoding="utf-8")):
            assert place_of(module) != ("command line", None), (p.name, module)


@pytest.mark.parametrize("path, source, expected", [
    ("engine/execute/x.py", "def f():\n    from specplan.planner.cost import op_time_s\n", [("engine/execute/x.py",
                                                                                         "planner")]),
    ("engine/model/x.py", "import specplan.engine.io.store\n", [("engine/model/x.py", "engine.io")]),
    ("engine/io/x.py", "from specplan.engine.model import forward\n", []),
    ("planner/x.py", "from specplan.simulator import simulate\n", [("planner/x.py", "simulator")]),
    ("planner/x.py", "from specplan import commands\n", [("planner/x.py", "specplan.commands")]),
    ("simulator/x.py", "from specplan.planner.cost import op_time_s\nimport numpy\n", []),
    ("validation/x.py", "from specplan.engine.execute.runtime import run_plan\n", []),
    ("validation/x.py", "class A:\n    def f(self):\n        import specplan.cli\n", [("validation/x.py",
                                                                                    "specplan.cli")]),
])
def test_the_checker_sees_function_local_and_forbidden_imports(path, source, expected):
    assert violations(path, source) == expected
