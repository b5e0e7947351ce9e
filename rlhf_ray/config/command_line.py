"""The run's settings from the command line, parsed by tyro against the `Config` dataclasses.

    [--config PRESET_OR_YAML] [--output_dir DIR] [--phases sft,reward,ppo] [--section.key VALUE]

tyro (the dataclass CLI CleanRL uses) derives every option from the frozen dataclasses in
`sections.py`: `--help` lists each setting with its type, default (from the chosen preset) and
the field's comment; a wrong type, a missing value or an unknown key exits 2 with a message
naming it. Lists are space-separated (`--lora.target_modules q_proj v_proj`); booleans are
`true`/`false`. Validation in the dataclasses raises `ConfigError`, which the caller reports.
Only the standard library, yaml and tyro are imported here, so `--help` is quick and quiet.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence

import tyro
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, PrimitiveTypeInfo

from rlhf_ray.config.loading import DEFAULT_PRESET, load_config, preset_names
from rlhf_ray.config.sections import Config
from rlhf_ray.errors import ConfigError

_TRUE, _FALSE = ("true", "True"), ("false", "False")
# The shortcuts and the settings they stand for
_SHORTCUTS = {"--output_dir": "--run.output_dir", "--phases": "--run.phases"}
_REGISTRY = ConstructorRegistry()


@_REGISTRY.primitive_rule
def _bool_rule(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    """Booleans take an explicit value, `true` or `false` (as in YAML), never a bare flag."""
    if info.type is not bool:
        return None
    return PrimitiveConstructorSpec(
        nargs=1,
        metavar="{true,false}",
        instance_from_str=lambda args: args[0] in _TRUE,
        is_instance=lambda value: isinstance(value, bool),
        str_from_instance=lambda value: ["true" if value else "false"],
        choices=_TRUE + _FALSE,
    )


def description(prog: str) -> str:
    return (
        f"{prog}: SFT, then the reward model, then PPO, then the gold judge's report. Any phase "
        "whose complete output exists in run.output_dir is skipped, so rerunning resumes.\n\n"
        f"--config PRESET_OR_YAML  a preset ({', '.join(preset_names())}; without --config: "
        f"{DEFAULT_PRESET}) or a YAML file; the options below override it and --help shows "
        "its values as defaults. --output_dir DIR and --phases sft,reward,ppo are short for "
        "--run.output_dir and --run.phases. Uses the Ray cluster in RAY_ADDRESS when set, and "
        "starts a local one otherwise."
    )


def parse_run_args(argv: Sequence[str], prog: str = "rlhf-ray run") -> Config:
    """The run's config; exits 2 (tyro) on a malformed argument, raises ConfigError on a bad
    value or config file."""
    _refuse_repeated_options(argv)
    shortcuts = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    shortcuts.add_argument("--config")
    shortcuts.add_argument("--output_dir")
    shortcuts.add_argument("--phases")
    known, rest = shortcuts.parse_known_args(list(argv))
    if known.output_dir is not None:
        rest += ["--run.output_dir", known.output_dir]
    if known.phases is not None:
        rest += ["--run.phases", *known.phases.split(",")]
    return tyro.cli(
        Config,
        prog=prog,
        description=description(prog),
        args=rest,
        default=load_config(known.config),
        use_underscores=True,
        registry=_REGISTRY,
        config=(tyro.conf.FlagConversionOff,),
    )


def _refuse_repeated_options(argv: Sequence[str]) -> None:
    """A setting given twice (also as its shortcut and its long form) is refused: taking the
    last one silently would run with a value the user may not have meant."""
    given = Counter(_setting_of(arg) for arg in argv if arg.startswith("--"))
    twice = [name for name, count in given.items() if count > 1]
    if twice:
        raise ConfigError(
            f"{', '.join(twice)} given twice on the command line; expected each setting once "
            "(--output_dir is short for --run.output_dir, --phases for --run.phases)"
        )


def _setting_of(option: str) -> str:
    """`--output_dir=a` -> `--run.output_dir`: the setting an option names."""
    name = option.split("=", 1)[0].replace("-", "_")
    name = "--" + name.removeprefix("__")
    return _SHORTCUTS.get(name, name)
