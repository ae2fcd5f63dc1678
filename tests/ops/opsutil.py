"""Helpers of the operations tests: the repository's docker/ files, compose interpolation, and the names of the
environment variables the code reads (from ``Settings.model_fields`` and the library's ``os.environ`` reads)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
KUBERAY = DOCKER / "kuberay-raycluster.yaml"
GUIDE = REPO / "docs" / "operations.md"
CONSTRAINTS = DOCKER / "constraints.txt"
DOCKERFILES = {"api": DOCKER / "api.Dockerfile", "worker": DOCKER / "worker.Dockerfile"}

VAR_NAME = re.compile(r"\bVOXELDOSE_[A-Z0-9_]*[A-Z0-9]\b")
_INTERP = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\})*))?\}")


def load_yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}``, ``${VAR:+alt}`` over a
    loaded YAML tree (``$$`` is a literal ``$``); a required variable that is unset raises ``KeyError``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        val = env.get(name)
        if op is None:
            return val or ""
        unset_or_empty = val is None or (op.startswith(":") and val == "")
        if op.endswith("-"):
            return interpolate(arg, env) if unset_or_empty else val
        if op.endswith("?"):
            if unset_or_empty:
                raise KeyError(f"{name}: {arg}")
            return val
        return interpolate(arg, env) if not unset_or_empty else ""  # ":+" / "+"

    out = value.replace("$$", "\0")
    for _ in range(5):  # nested defaults
        new = _INTERP.sub(sub, out)
        if new == out:
            break
        out = new
    return out.replace("\0", "$")


def settings_env_names() -> dict[str, str]:
    """``{environment variable: Settings field}`` for every setting, derived from ``Settings.model_fields``:
    the prefix plus the upper-case field name, or, for a field with a validation alias, each alias."""
    from pydantic import AliasChoices, AliasPath

    from service.config import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    names: dict[str, str] = {}
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias or info.alias
        if alias is None:
            names[(prefix + field).upper()] = field
            continue
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        for choice in choices:
            if isinstance(choice, AliasPath):
                continue
            names[str(choice).upper()] = field  # env names are case-insensitive (case_sensitive=False)
    return names


def library_env_names() -> set[str]:
    """``VOXELDOSE_*`` variables the code reads outside ``Settings``: every complete ``"VOXELDOSE_..."`` string
    literal in voxeldose/ and service/ (``os.environ.get("VOXELDOSE_KERNEL_DIR")``, ``ENV_VAR = "VOXELDOSE_DEVICE"``)
    that is not a setting."""
    literal = re.compile(r"""["'](VOXELDOSE_[A-Z0-9_]*[A-Z0-9])["']""")
    found: set[str] = set()
    for pkg in ("voxeldose", "service"):
        for path in (REPO / pkg).rglob("*.py"):
            found.update(literal.findall(path.read_text(errors="replace")))
    return found - set(settings_env_names())


def known_env_names() -> set[str]:
    return set(settings_env_names()) | library_env_names()


def guide_table(text: str, marker: str) -> list[str]:
    """Variable names of the rows of the table between ``<!-- MARKER:begin -->`` and ``<!-- MARKER:end -->``: the
    first cell of each row, one backticked name per row."""
    m = re.search(rf"<!--\s*{marker}:begin\s*-->(.*?)<!--\s*{marker}:end\s*-->", text, re.S)
    if not m:
        raise AssertionError(
            f"{GUIDE.relative_to(REPO)}: no table between <!-- {marker}:begin --> and <!-- {marker}:end -->"
        )
    names = []
    for line in m.group(1).splitlines():
        line = line.strip()
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        first = line.strip("|").split("|")[0].strip()
        if first.lower() in ("variable", "name"):
            continue
        cell = re.fullmatch(r"`([A-Z][A-Z0-9_]*)`", first)
        if not cell:
            raise AssertionError(f"{GUIDE.relative_to(REPO)}: table {marker}: first cell is not one `NAME`: {line!r}")
        names.append(cell.group(1))
    return names


def constraint_pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
            assert m, f"docker/constraints.txt: not name==version: {line!r}"
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins
