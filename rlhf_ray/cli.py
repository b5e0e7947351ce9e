"""The `rlhf-ray` console script: `rlhf-ray run [options]`, the same as `python jobs/rlhf.py`."""

from __future__ import annotations

import argparse
import sys

from rlhf_ray.config import Config
from rlhf_ray.config_loader import load_config
from rlhf_ray.errors import ConfigError

USAGE = """usage: rlhf-ray run [--config PRESET_OR_YAML] [--output_dir DIR]
                    [--phases sft,reward,ppo] [--section.key VALUE ...]

Runs supervised fine-tuning, the reward model and PPO in order, skipping any phase whose
complete output exists in DIR. Presets: default (embedded CPU run), smoke, mistral-7b-qlora.
Any config key can be overridden, e.g. --sft.epochs 2 --ppo.num_rollout_actors 2.
Uses the Ray cluster in RAY_ADDRESS when set, and starts a local one otherwise."""


def parse_run_args(argv: list[str]) -> Config:
    """The run's config from the command line; ConfigError names any bad key or value."""
    parser = argparse.ArgumentParser(
        prog="rlhf-ray run", usage=USAGE, add_help=False, allow_abbrev=False
    )
    parser.add_argument("--config")
    parser.add_argument("--output_dir")
    parser.add_argument("--phases")
    known, rest = parser.parse_known_args(argv)
    overrides = _overrides(rest)
    if known.output_dir is not None:
        overrides["run.output_dir"] = known.output_dir
    if known.phases is not None:
        overrides["run.phases"] = known.phases
    return load_config(known.config, overrides)


def _overrides(args: list[str]) -> dict[str, str]:
    """`--a.b v` and `--a.b=v` pairs; anything else is an error naming the argument."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"unexpected argument {arg!r}; expected --section.key VALUE")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args):
            key, value = arg[2:], args[i + 1]
            i += 2
        else:
            raise ConfigError(f"{arg}: missing value")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] != "run":
        print(USAGE)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(USAGE)
        return 0
    from jobs.rlhf import main as run_main

    return run_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
