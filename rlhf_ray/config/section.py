"""The base of every config section: finite numbers, encodable text, errors that name the key."""

from __future__ import annotations

import math
import os
from dataclasses import fields
from typing import ClassVar

from rlhf_ray.errors import ConfigError


class Section:
    """What every section checks before its own rules: finite numbers and encodable text (and
    `~` in paths expanded)."""

    section: ClassVar[str]  # the YAML section / command-line prefix, e.g. "sft"
    # Settings that name a file or directory: a leading `~` is the user's home, as in a shell
    # (YAML and a quoted command-line value keep it as written)
    paths: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for key in self.paths:
            value = getattr(self, key)
            if isinstance(value, str) and value.startswith("~"):
                object.__setattr__(self, key, os.path.expanduser(value))  # frozen: set once here
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                self.fail(f.name, value, "a finite number")
            for text in value if isinstance(value, tuple) else (value,):
                if isinstance(text, str) and not _is_utf8(text):
                    self.fail(f.name, text, "text that is valid UTF-8")
        self.validate()

    def validate(self) -> None:
        """The section's own rules; raise with `self.fail`."""

    def fail(self, key: str, value: object, allowed: str) -> None:
        raise ConfigError(f"{self.section}.{key}={value!r}: expected {allowed}")

    def check(self, ok: bool, key: str, allowed: str) -> None:
        if not ok:
            self.fail(key, getattr(self, key), allowed)

    def positive(self, *keys: str) -> None:
        for key in keys:
            self.check(getattr(self, key) > 0, key, "a number > 0")

    def non_negative(self, *keys: str) -> None:
        for key in keys:
            self.check(getattr(self, key) >= 0, key, "a number >= 0")

    def one_of(self, key: str, allowed: tuple[str, ...]) -> None:
        self.check(getattr(self, key) in allowed, key, f"one of {', '.join(allowed)}")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # command-line bytes that are not UTF-8 arrive as surrogates
    except UnicodeEncodeError:
        return False
    return True
