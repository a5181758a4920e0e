"""Reading and writing the JSON contracts: validated on load with one-line errors, written atomically."""

from __future__ import annotations

import codecs
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from specplan.errors import ContractError

M = TypeVar("M", bound=BaseModel)

#: the largest text file a command reads (plans embed a profile and are a few MB at most).
MAX_TEXT_BYTES = 256 << 20
_HEAD_BYTES = 1 << 16


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


def read_text(path: str | os.PathLike, expected: str = "a JSON file") -> str:
    """The UTF-8 text of a file, raising ``ContractError`` with the file name on any problem (binary files too)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ContractError(f"{path}: not a regular file, expected {expected}")
            head = f.read(_HEAD_BYTES)
            decode_text(head, str(path), expected, partial=True)  # a binary file is refused before it is read whole
            size = os.fstat(f.fileno()).st_size
            if size > MAX_TEXT_BYTES:
                raise ContractError(f"{path}: {size} bytes is too large for {expected} "
                                    f"(at most {MAX_TEXT_BYTES >> 20} MiB)")
            raw = head + f.read()
    except FileNotFoundError:
        raise ContractError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ContractError(f"{path}: is a folder, expected {expected}") from None
    except OSError as e:
        raise ContractError(f"{path}: cannot read ({e.strerror}), expected {expected}") from None
    return decode_text(raw, str(path), expected)


def decode_text(raw: bytes, source: str, expected: str = "a JSON file", partial: bool = False) -> str:
    """``raw`` as UTF-8 text; a binary file (a .gguf, a .safetensors ...) gives one ``ContractError`` line.

    ``partial``: ``raw`` is the head of a file, and may end inside a character.
    """
    if raw.startswith(b"GGUF"):
        raise ContractError(f"{source}: is a GGUF file (binary), expected {expected}")
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(raw, final=not partial)
    except UnicodeDecodeError as e:
        raise ContractError(f"{source}: not a text file (byte 0x{raw[e.start]:02x} at offset {e.start} is not UTF-8); "
                            f"expected {expected}") from None
    if "\x00" in text:
        raise ContractError(f"{source}: not a text file (contains NUL bytes); expected {expected}")
    return text.removeprefix("\ufeff")


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {literal[:40]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; write a finite number")


def parse_json(text: str, source: str) -> Any:
    """Parse JSON text strictly (no NaN / Infinity, no out-of-range numbers); ``ContractError`` naming ``source``."""
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise ContractError(f"{source}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except ValueError as e:  # NaN / Infinity / 1e999, or an integer of more than 4300 digits
        raise ContractError(f"{source}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    except RecursionError:
        raise ContractError(f"{source}: not valid JSON (nested too deeply)") from None


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file, raising ``ContractError`` with the file name on any problem."""
    return parse_json(read_text(path), str(path))


def describe_validation_error(err: ValidationError) -> str:
    """The first problem of a pydantic error as 'field a.b.c: message (got X)'."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "(top level)"
    got = first.get("input")
    got_text = ""
    if not isinstance(got, (dict, list)) and first.get("type") != "missing":
        got_repr = repr(got)
        got_text = f" (got {got_repr if len(got_repr) <= 60 else got_repr[:57] + '...'})"
    more = len(err.errors()) - 1
    tail = f"; and {more} more problem{'s' if more > 1 else ''}" if more > 0 else ""
    return f"field '{loc}': {first['msg']}{got_text}{tail}"


def validate(model: type[M], data: Any, source: str) -> M:
    """Validate Python ``data`` as ``model`` in strict mode (no coercion); ``source`` names the file in the error."""
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as e:
        raise ContractError(f"{source}: not a valid {model.__name__}: {describe_validation_error(e)}") from None
    except RecursionError:
        raise ContractError(f"{source}: not a valid {model.__name__}: nested too deeply") from None


def validate_json(model: type[M], text: str, source: str) -> M:
    """Validate JSON ``text`` as ``model`` in strict JSON mode: a string is never a number, nor a number a string.

    JSON mode takes arrays for tuple fields and integers for float fields, as JSON has no other way to write them.
    """
    parse_json(text, source)  # the one-line syntax errors, and no NaN / Infinity
    try:
        return model.model_validate_json(text, strict=True)
    except ValidationError as e:
        raise ContractError(f"{source}: not a valid {model.__name__}: {describe_validation_error(e)}") from None
    except RecursionError:
        raise ContractError(f"{source}: not a valid {model.__name__}: nested too deeply") from None


def load(model: type[M], path: str | os.PathLike) -> M:
    """Load and validate a contract file: one-line ``ContractError`` naming file and field on failure."""
    return validate_json(model, read_text(path), str(path))
