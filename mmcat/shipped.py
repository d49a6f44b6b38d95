"""The files mmcat ships: training configs (``configs/``) and launcher files (``launch/``: accelerate YAMLs, DeepSpeed
JSONs), found by name, listed, and copied out for editing (``mmcat configs list|path|copy``).

Names are paths relative to the top-level folders, without the suffix: ``configs/tiny_cpu``,
``launch/deepspeed_zero2``, ``launch/deepspeed/zero2``; a training config may also be named bare (``tiny_cpu``).
In a source checkout (editable install, or run in place) the files are the checkout's top-level ``configs/`` and
``launch/``; an installed wheel carries the same files as package data (``mmcat/configs``, ``mmcat/launch``:
pyproject.toml maps the folders), so ``mmcat train --config tiny_cpu`` works from any folder.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional

from mmcat.config import ConfigError

KINDS = ("configs", "launch")
SUFFIXES = (".yaml", ".json")
# the line of an accelerate YAML that points at its DeepSpeed JSON (a path relative to the launch folder's parent)
_DS_LINE = re.compile(r"^(\s*deepspeed_config_file:\s*)(\S+)\s*$", re.MULTILINE)


def shipped_root(kind: str) -> Path:
    """The folder holding ``kind`` (``configs`` or ``launch``)."""
    package = Path(__file__).resolve().parent
    if (package / kind).is_dir():  # installed: package data
        return package / kind
    checkout = package.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / kind).is_dir():  # a source checkout
        return checkout / kind
    raise FileNotFoundError(f"mmcat's shipped {kind}/ folder is missing next to {package} (a broken install?)")


def shipped_files() -> Dict[str, Path]:
    """Every shipped file by name (``launch/deepspeed/zero2`` -> its path), sorted by name."""
    found: Dict[str, Path] = {}
    for kind in KINDS:
        root = shipped_root(kind)
        for path in root.rglob("*"):
            if path.suffix in SUFFIXES and path.is_file():
                found[f"{kind}/{path.relative_to(root).with_suffix('').as_posix()}"] = path
    return dict(sorted(found.items()))


def find_shipped(name: str) -> Optional[Path]:
    """The shipped file called ``name`` (with or without its suffix; a bare name is a training config), or None."""
    suffix = Path(name).suffix if Path(name).suffix in SUFFIXES else ""
    stem = name[: len(name) - len(suffix)]
    path = shipped_files().get(stem if "/" in stem else f"configs/{stem}")
    return path if path is not None and suffix in ("", path.suffix) else None


def shipped_config(name: str) -> Optional[Path]:
    """A training config by name (``tiny_cpu``, ``tiny_cpu.yaml``, ``configs/tiny_cpu``), or None."""
    path = find_shipped(name)
    return path if path is not None and path.parent == shipped_root("configs") else None


def resolve_launch_path(path: str) -> Path:
    """A file named in a launcher YAML (``launch/deepspeed/zero2.json``): as given when it exists (relative to the
    working folder, as accelerate reads it), else the shipped file of that relative path, so the packaged launch
    YAMLs work from any folder; else as given (the caller reports it missing)."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    return _shipped_by_path(given) or given


def _shipped_by_path(relative: Path) -> Optional[Path]:
    """``launch/deepspeed/zero2.json`` -> that shipped file, or None."""
    parts = relative.parts
    if len(parts) < 2 or parts[0] not in KINDS:
        return None
    path = shipped_root(parts[0]).joinpath(*parts[1:])
    return path if path.is_file() else None


def describe(path: Path) -> str:
    """One line on what a shipped file is for: a YAML's first comment (launch YAMLs start with ``# When: ...``);
    a DeepSpeed JSON's ZeRO stage."""
    if path.suffix == ".json":
        return f"DeepSpeed config, ZeRO stage {json.loads(path.read_text())['zero_optimization']['stage']}"
    first = path.read_text().splitlines()[:1]
    return first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""


def copy_shipped(name: str, dest: str | Path, force: bool = False) -> List[Path]:
    """Copy a shipped file to ``dest`` (a folder, or a file path with the same suffix) for editing; returns the
    written paths. A launch YAML brings its DeepSpeed JSON along (``DEST/deepspeed/<json>``) and points at the copy
    by absolute path: accelerate resolves that path from the working folder, so the copy works from anywhere."""
    source = find_shipped(name)
    if source is None:
        raise ConfigError(f"no shipped config named '{name}' (see `mmcat configs list`)")
    dest = Path(dest)
    target = dest if dest.suffix == source.suffix else dest / source.name
    files = {target: source.read_text()}
    match = _DS_LINE.search(files[target]) if source.suffix == ".yaml" else None
    if match is not None:
        json_source = _shipped_by_path(Path(match.group(2)))
        if json_source is None:  # pragma: no cover - tests check every shipped YAML
            raise FileNotFoundError(f"{source} names {match.group(2)}, which mmcat does not ship")
        json_target = target.parent / "deepspeed" / json_source.name
        files[json_target] = json_source.read_text()
        files[target] = _DS_LINE.sub(lambda m: f"{m.group(1)}{json_target.resolve()}", files[target], count=1)
    for path in files:  # all or nothing: refuse before writing anything
        if path.exists() and not force:
            raise ConfigError(f"{path} exists (pass --force to overwrite)")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)
