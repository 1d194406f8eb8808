"""Typed configuration loaded from YAML.

Configs are data: YAML is read with ``yaml.safe_load`` (no tags, no object construction), and
every config model forbids unknown keys so that a typo is an error, not a silent default.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from moon2.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound="Config")


class Config(BaseModel):
    """Base class of every moon2 config: strict keys, validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @classmethod
    def from_yaml(cls: type[ConfigT], path: str | Path | None, **overrides: Any) -> ConfigT:
        """Load ``path`` (or the defaults when None) and apply non-None ``overrides``."""
        data: dict[str, Any] = {}
        if path is not None:
            data = read_yaml(path)
        data.update({key: value for key, value in overrides.items() if value is not None})
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            where = f" in {path}" if path is not None else ""
            raise ConfigError(f"invalid {cls.__name__}{where}: {_summarise(exc)}") from None

    def to_yaml(self, path: str | Path, header: str = "") -> None:
        """Write the config (every field, defaults included), each field under its docs."""
        Path(path).write_text(commented_yaml(self, header), encoding="utf-8")


def commented_yaml(config: BaseModel, header: str = "") -> str:
    """YAML of ``config`` with every field's description as a comment above it."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    if lines:
        lines.append("")
    _emit(config, lines, 0)
    return "\n".join(lines).rstrip() + "\n"


def _emit(config: BaseModel, lines: list[str], indent: int) -> None:
    pad = " " * indent
    for name, field in type(config).model_fields.items():
        if field.description:
            lines.extend(
                pad + "# " + part
                for part in textwrap.wrap(field.description, width=max(40, 98 - indent))
            )
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            _emit(value, lines, indent + 2)
        elif isinstance(value, (dict, list, tuple)):
            # JSON is YAML flow style: one readable line per list or mapping
            lines.append(f"{pad}{name}: {json.dumps(_jsonable(value), ensure_ascii=False)}")
        else:
            text = yaml.safe_dump(
                {name: _jsonable(value)}, sort_keys=False, allow_unicode=True, width=1000
            ).rstrip()
            lines.extend(pad + line for line in text.splitlines())
        if indent == 0:
            lines.append("")


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):
        return value.value
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, found {type(data).__name__}")
    return data


def _summarise(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(item) for item in error["loc"]) or "<root>"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)
