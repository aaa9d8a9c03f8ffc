"""Build frozen config dataclasses from TOML, collecting every problem before raising.

A config class is a frozen dataclass whose fields are ``bool``, ``int``, ``float``, ``str``,
``tuple[str, ...]``, a ``Literal[...]`` of strings or another config class (a TOML table).
A class may define ``problems(self) -> list[str]`` for checks across fields, and
``given_problems(self, given: frozenset[str]) -> list[str]`` for checks of which keys the file
gives (a table that must not be there, even empty). Unknown keys,
wrong types and failed checks are gathered into one :class:`ConfigError` that lists them all
(litgpt's ``validate_args`` style), so a user fixes a file in one pass.

Fields marked ``field(metadata={"path": True})`` are file paths: a relative path in a file is
resolved against that file's folder, so a config and its data can move together; values that
start with one of the field's ``metadata["schemes"]`` (e.g. ``icd10:``) are not paths.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from fed_llama.errors import ConfigError

T = TypeVar("T")


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, turning a missing file or a syntax error into a one-line ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist: check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse a ``--set section.key=value`` override; the value is read as TOML, else a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=50")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return [part.strip() for part in key.split(".")], value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``section.key=value`` override applied."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for part in keys[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a table")
            node[part] = child = dict(child)
            node = child
        node[keys[-1]] = value
    return out


def build_config(cls: type[T], data: Mapping[str, Any], *, source: str,
                 base_dir: Path | None = None) -> T:
    """Build ``cls`` from ``data`` or raise one ConfigError listing every problem found."""
    problems: list[str] = []
    obj = _build(cls, data, "", problems, base_dir)
    if problems or obj is None:
        listed = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        raise ConfigError(f"{source}: {len(problems)} {noun}:\n{listed}")
    return obj


def load_config(cls: type[T], path: Path, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a TOML file with optional ``--set`` overrides."""
    data = apply_overrides(read_toml(path), overrides or [])
    return build_config(cls, data, source=str(path), base_dir=path.resolve().parent)


def _build(cls: type[T], data: Mapping[str, Any], prefix: str, problems: list[str],
           base_dir: Path | None) -> T | None:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            problems.append(f"unknown key {prefix + key} (known keys here: {known})")
    values: dict[str, Any] = {}
    ok = True
    for name, fld in fields.items():
        if name not in data:
            continue
        where = prefix + name
        hint = hints[name]
        raw = data[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(raw, Mapping):
                problems.append(f"{where} must be a table ([{where}]), got {raw!r}")
                ok = False
                continue
            sub = _build(hint, raw, where + ".", problems, base_dir)  # type: ignore[arg-type]
            if sub is None:
                ok = False
            values[name] = sub
            continue
        error, value = _coerce(hint, raw)
        if error:
            problems.append(f"{where} {error}")
            ok = False
            continue
        if fld.metadata.get("path") and base_dir is not None:
            schemes = tuple(fld.metadata.get("schemes", ()))
            if isinstance(value, tuple):
                value = tuple(_resolve(v, base_dir, schemes) for v in value)
            else:
                value = _resolve(value, base_dir, schemes)
        values[name] = value
    if not ok:
        return None
    obj = cls(**values)
    check = getattr(obj, "problems", None)
    if callable(check):
        problems.extend(f"{prefix}{p}" for p in check())
    given = getattr(obj, "given_problems", None)
    if callable(given):
        problems.extend(f"{prefix}{p}" for p in given(frozenset(data)))
    return obj


def _resolve(value: str, base_dir: Path, schemes: tuple[str, ...]) -> str:
    """A relative path against ``base_dir``; empty values and scheme values stay as they are."""
    if not value or value.startswith(schemes):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base_dir / path)


def _coerce(hint: Any, raw: Any) -> tuple[str, Any]:
    """Check ``raw`` against a field type; return (error, value) with error '' when fine."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if raw in choices:
            return "", raw
        return f"must be one of {', '.join(repr(c) for c in choices)}; got {raw!r}", None
    if hint is bool:
        return ("", raw) if isinstance(raw, bool) else (f"must be true or false; got {raw!r}", None)
    if hint is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return "", raw
        return f"must be a whole number; got {raw!r}", None
    if hint is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return "", float(raw)
        return f"must be a number; got {raw!r}", None
    if hint is str:
        return ("", raw) if isinstance(raw, str) else (f"must be a string; got {raw!r}", None)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(raw, list):
            return f"must be a list; got {raw!r}", None
        values = []
        for x in raw:
            error, value = _coerce(item, x)
            if error:
                return f"must be a list whose items each {error}", None
            values.append(value)
        return "", tuple(values)
    if origin in (types.UnionType, typing.Union):  # pragma: no cover - not used by our configs
        raise TypeError(f"optional fields are not supported by the config loader: {hint}")
    raise TypeError(f"unsupported config field type {hint!r}")  # pragma: no cover
