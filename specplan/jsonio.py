"""Reading and writing the JSON contracts: validated on load with one-line errors, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from specplan.errors import ContractError

M = TypeVar("M", bound=BaseModel)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    An interrupted run leaves either the old file or the new one, never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: BaseModel | dict | list) -> Path:
    """Write a contract (or plain JSON data) atomically, pretty-printed."""
    if isinstance(obj, BaseModel):
        text = obj.model_dump_json(indent=1)
    else:
        text = json.dumps(obj, indent=1, allow_nan=False)
    return write_atomic(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file, raising ``ContractError`` with the file name on any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ContractError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ContractError(f"{path}: is a folder, expected a JSON file") from None
    except OSError as e:
        raise ContractError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ContractError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def describe_validation_error(err: ValidationError) -> str:
    """The first problem of a pydantic error as 'field a.b.c: message (got X)'."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "(top level)"
    got = first.get("input")
    got_text = ""
    if not isinstance(got, (dict, list)) and first.get("type") != "missing":
        got_text = f" (got {got!r})"
    more = len(err.errors()) - 1
    tail = f"; and {more} more problem{'s' if more > 1 else ''}" if more > 0 else ""
    return f"field '{loc}': {first['msg']}{got_text}{tail}"


def validate(model: type[M], data: Any, source: str) -> M:
    """Validate ``data`` as ``model``; ``source`` names the file or object in the error."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ContractError(f"{source}: not a valid {model.__name__}: {describe_validation_error(e)}") from None


def load(model: type[M], path: str | os.PathLike) -> M:
    """Load and validate a contract file: one-line ``ContractError`` naming file and field on failure."""
    return validate(model, read_json(path), str(path))
