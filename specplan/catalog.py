"""Finding models and hardware profiles by short name or path.

Models: a path to a ``config.json``, to a model folder or to a GGUF file, or a name from the bundled catalog
(``profiles/models/<name>.json``, the published config.json of well-known models).
Profiles: a path, a bundled name (``profiles/hardware/<name>.json``), or this machine's measured profiles in
``$SPECPLAN_HOME/profiles`` (default ``~/.specplan/profiles``).
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path

from specplan.contracts.hardware import HardwareProfile
from specplan.contracts.model import ModelSpec, from_hf_config
from specplan.errors import SpecplanError
from specplan.gguf import is_gguf, load_gguf_spec
from specplan.jsonio import load, read_json
from specplan.machine import here


def _bundled(kind: str) -> Path:
    return Path(str(resources.files("specplan.profiles").joinpath(kind)))


def _key(name: str) -> str:
    return name.lower().replace("_", "-").replace(" ", "-")


def _did_you_mean(key: str, names: list[str], otherwise: str) -> str:
    """'did you mean a or b?' with the names closest to ``key`` (difflib), else ``otherwise``."""
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5) if len(names) > 3 else names
    return f"did you mean {' or '.join(close)}?" if close else otherwise


# ---- models -----------------------------------------------------------------------------------------------------


def catalog_models() -> dict[str, Path]:
    """Short name -> bundled config.json, sorted by name."""
    return {p.stem: p for p in sorted(_bundled("models").glob("*.json"))}


def model_config_path(name_or_path: str) -> Path:
    """The config.json a model argument refers to; ``SpecplanError`` saying what exists if none."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise SpecplanError(f"{p}: folder has no config.json; pass an HF model folder or a catalog name")
        return cfg
    if p.is_file():
        return p
    cat = catalog_models()
    key = _key(name_or_path)
    if key in cat:
        return cat[key]
    matches = [n for n in cat if n.startswith(key) or key in n]
    if len(matches) == 1:
        return cat[matches[0]]
    hint = _did_you_mean(key, matches or list(cat), "see `specplan models` for the catalog")
    raise SpecplanError(f"unknown model '{name_or_path}': not a file, folder or catalog name; {hint}")


def load_model_spec(name_or_path: str) -> ModelSpec:
    """The ``ModelSpec`` of a catalog name, an HF ``config.json`` or folder, or a GGUF file (``specplan.gguf``)."""
    cfg = model_config_path(name_or_path)
    if is_gguf(cfg):
        return load_gguf_spec(cfg)
    data = read_json(cfg)
    in_catalog = cfg.parent == _bundled("models")
    name = cfg.stem if in_catalog else (cfg.parent.name if cfg.name == "config.json" else cfg.stem)
    return from_hf_config(data, name=name, source=str(cfg))


def model_weights(name_or_path: str) -> str | None:
    """Where the weights of a model argument are on this machine: its HF folder (config.json and safetensors),
    its GGUF file, or None (a catalog name, a bare config.json)."""
    cfg = model_config_path(name_or_path)
    if is_gguf(cfg):
        return str(cfg.resolve())
    if cfg.name == "config.json" and any(cfg.parent.glob("*.safetensors")):
        return str(cfg.parent)
    return None


# ---- hardware profiles ------------------------------------------------------------------------------------------


def user_dir() -> Path:
    return Path(os.environ.get("SPECPLAN_HOME", Path.home() / ".specplan")).expanduser()


def user_profiles_dir() -> Path:
    return user_dir() / "profiles"


def contended_profiles_dir() -> Path:
    """Where ``specplan profile`` keeps a measurement it refused as this machine's (contended): never read as
    this machine's profile, only when named with --profile."""
    return user_dir() / "contended-profiles"


def contended_profiles() -> list[Path]:
    """The refused (contended) measurements of this machine, newest first."""
    return sorted(contended_profiles_dir().glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)


def bundled_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(_bundled("hardware").glob("*.json"))}


def measured_profiles() -> list[Path]:
    """This machine's measured profiles, newest first (by file time)."""
    d = user_profiles_dir()
    if not d.is_dir():
        return []
    return sorted(d.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)


def current_profiles() -> list[Path]:
    """This machine's measured profiles that are not stale and were measured on this CPU with this engine code
    (both recorded and equal: one that does not record them is of unknown code), newest first; unreadable ones are
    left out."""
    out = []
    for path in measured_profiles():
        try:
            pv = load(HardwareProfile, path).provenance
        except SpecplanError:
            continue
        if not pv.stale() and (pv.cpu_name, pv.engine_digest) == here():
            out.append(path)
    return out


def profile_path(name_or_path: str | None) -> Path:
    """Resolve a profile argument; None means this machine's newest current profile (``current_profiles``), else
    its newest measured one (whose warnings then say why it is not current)."""
    if name_or_path is None:
        found = current_profiles() or measured_profiles()
        if not found:
            raise SpecplanError(
                f"no measured profile of this machine in {user_profiles_dir()}: run `specplan profile --quick` "
                f"or pass --profile with a bundled one ({', '.join(bundled_profiles())})"
            )
        return found[0]
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    bundled = bundled_profiles()
    key = _key(name_or_path)
    if key in bundled:
        return bundled[key]
    mine = {q.stem: q for q in measured_profiles()}
    if name_or_path in mine:
        return mine[name_or_path]
    hint = _did_you_mean(key, [*bundled, *mine], "`specplan profile --show NAME` prints one")
    raise SpecplanError(
        f"unknown profile '{name_or_path}': not a file, and not bundled ({', '.join(bundled)}) or measured here; {hint}"
    )


def load_profile(name_or_path: str | None = None) -> HardwareProfile:
    return load(HardwareProfile, profile_path(name_or_path))
