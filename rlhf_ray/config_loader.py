"""Build a `Config` from a YAML preset plus `--section.key value` overrides.

Every key is checked against the dataclass fields and every value against the field's type,
so a typo or a wrong type is an error that names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from rlhf_ray.config import Config
from rlhf_ray.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = "default"
_NONE_WORDS = ("none", "null", "~")


def preset_path(name_or_path: str) -> Path:
    """A preset name (`smoke`) or a YAML path. Raises ConfigError when neither exists."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"--config {name_or_path}: no such file")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"--config {name_or_path}: not a file and not a preset; presets: {known}")
    return preset


def load_config(config: str | None = None, overrides: dict[str, str] | None = None) -> Config:
    """Load a preset (default when `config` is None) and apply string overrides `section.key`."""
    path = preset_path(config or DEFAULT_PRESET)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {name: _typed_section(name, values, str(path)) for name, values in raw.items()}
    for dotted, text in (overrides or {}).items():
        section, key = _split_key(dotted)
        hints = _field_types(section)
        sections.setdefault(section, {})[key] = _parse_text(f"--{dotted}", text, hints[key])
    return build_config(sections)


def build_config(sections: dict[str, dict[str, Any]]) -> Config:
    """Construct every section's dataclass, prefixing validation errors with the section."""
    built = {}
    for name, values in sections.items():
        cls = _section_class(name)
        try:
            built[name] = cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{name}.{err}") from None
    return Config(**built)


def config_to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Plain dict (tuples as lists) for YAML/JSON output of the resolved config."""
    out = dataclasses.asdict(config)
    for section in out.values():
        for key, value in section.items():
            if isinstance(value, tuple):
                section[key] = list(value)
    return out


def _section_class(name: str) -> type:
    for f in dataclasses.fields(Config):
        if f.name == name:
            return typing.get_type_hints(Config)[name]
    known = [f.name for f in dataclasses.fields(Config)]
    raise ConfigError(f"unknown config section {name!r}; sections: {known}")


def _field_types(section: str) -> dict[str, Any]:
    return typing.get_type_hints(_section_class(section))


def _split_key(dotted: str) -> tuple[str, str]:
    section, _, key = dotted.partition(".")
    if not key:
        raise ConfigError(f"--{dotted}: expected --section.key (e.g. --sft.epochs 2)")
    hints = _field_types(section)
    if key not in hints:
        raise ConfigError(f"unknown key {section}.{key}; keys of {section}: {sorted(hints)}")
    return section, key


def _typed_section(section: str, values: Any, where: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: section {section!r} must be a mapping")
    hints = _field_types(section)
    out = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{where}: unknown key {section}.{key}; keys: {sorted(hints)}")
        out[key] = _check_type(f"{section}.{key}", value, hints[key])
    return out


def _parse_text(name: str, text: str, hint: Any) -> Any:
    """Turn a command-line string into the field's type."""
    if _allows_none(hint) and text.strip().lower() in _NONE_WORDS:
        return None
    base = _strip_optional(hint)
    if base is bool:
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{name}={text!r}: expected true or false")
        return lowered in ("true", "1", "yes")
    if typing.get_origin(base) is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    try:
        return base(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected {base.__name__}") from None


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """Check a YAML value against the field's type; ints are accepted where floats are."""
    if value is None:
        if _allows_none(hint):
            return None
        raise ConfigError(f"{name}=None: expected a value of type {_type_name(hint)}")
    base = _strip_optional(hint)
    if typing.get_origin(base) is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}={value!r}: expected a list of strings")
        return tuple(value)
    ok = isinstance(value, base) and not (base is int and isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not ok:
        raise ConfigError(f"{name}={value!r}: expected {_type_name(hint)}")
    return value


def _allows_none(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _strip_optional(hint: Any) -> Any:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _type_name(hint: Any) -> str:
    base = _strip_optional(hint)
    name = getattr(base, "__name__", str(base))
    return f"{name} or null" if _allows_none(hint) else name
