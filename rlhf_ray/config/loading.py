"""A `Config` from a YAML preset or file: every key and value checked, nothing guessed.

Presets ship inside the package (`rlhf_ray/config/presets/*.yaml`), so an installed rlhf-ray
finds `--config smoke` from any directory. A YAML file is read strictly: a key written twice
(section or setting) is an error, a list setting must be a YAML list, a value must have the
field's type. Messages name the file, `section.key`, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rlhf_ray.config.sections import Config
from rlhf_ray.errors import ConfigError

DEFAULT_PRESET = "default"


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _preset_dir().iterdir() if _is_yaml(p))


def read_config_text(name_or_path: str) -> tuple[str, str]:
    """(YAML text, where it came from) for a preset name (`smoke`) or a YAML file path."""
    path = Path(name_or_path)
    if path.is_dir():
        raise ConfigError(f"--config {name_or_path}: is a directory; expected a YAML file")
    if path.is_file():
        return _decode(path.read_bytes(), str(path)), str(path)
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        preset = f"; the preset of that name is --config {path.stem}"
        shipped = path.stem in preset_names() and path.name == name_or_path
        raise ConfigError(f"--config {name_or_path}: no such file{preset if shipped else ''}")
    preset = _preset_dir() / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(
            f"--config {name_or_path}: not a file and not a preset; presets: {preset_names()}"
        )
    return _decode(preset.read_bytes(), f"preset {name_or_path}"), f"preset {name_or_path}"


def load_config(name_or_path: str | None = None) -> Config:
    """The config of a preset (the default one when None) or a YAML file."""
    text, where = read_config_text(name_or_path or DEFAULT_PRESET)
    return config_from_yaml(text, where)


def config_from_yaml(text: str, where: str) -> Config:
    try:
        raw = yaml.load(text, Loader=_StrictLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {}
    for name, values in raw.items():
        cls = _section_class(name, where)
        sections[name] = cls(**_typed_section(cls, values, where))
    return Config(**sections)


def config_to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Plain dict (tuples as lists) for YAML/JSON output of the resolved config."""
    out = dataclasses.asdict(config)
    for section in out.values():
        for key, value in section.items():
            if isinstance(value, tuple):
                section[key] = list(value)
    return out


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice; write it once", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads `1e-3` (no dot) as a string; accept it as a float as YAML 1.2 does.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _preset_dir():
    return resources.files("rlhf_ray.config") / "presets"


def _is_yaml(entry) -> bool:
    return entry.name.endswith(".yaml")


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{where}: not valid UTF-8 (byte {data[err.start]:#04x} on line {line}); "
            "expected a UTF-8 encoded YAML file"
        ) from None


def _section_class(name: Any, where: str) -> type:
    hints = typing.get_type_hints(Config)
    if name not in hints:
        raise ConfigError(f"{where}: unknown config section {name!r}; sections: {list(hints)}")
    return hints[name]


def _typed_section(cls: type, values: Any, where: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: section {cls.section!r} must be a mapping of settings")
    hints = {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(
                f"{where}: unknown key {cls.section}.{key}; keys of {cls.section}: {sorted(hints)}"
            )
        out[key] = _check_type(f"{where}: {cls.section}.{key}", value, hints[key])
    return out


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """Check a YAML value against the field's type; ints are accepted where floats are."""
    if value is None:
        if _allows_none(hint):
            return None
        raise ConfigError(f"{name}=None: expected a value of type {_type_name(hint)}")
    base = _strip_optional(hint)
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{name}={value!r}: expected a YAML list, e.g. {_LIST_EXAMPLE[item]}")
        return tuple(_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{name}={value!r}: expected {_type_name(hint)}")
    return value


_LIST_EXAMPLE = {str: "[a, b]", float: "[1.0, 0.5]"}


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
