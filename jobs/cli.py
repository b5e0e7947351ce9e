"""The `rlhf-ray` console script.

    rlhf-ray run [--config PRESET_OR_YAML] [options]    the three phases (= python jobs/rlhf.py)
    rlhf-ray config show [--config ...] [options]       the resolved config as YAML, nothing run
    rlhf-ray scale --rollout N [--address A] [--output_dir DIR]   generators of a running job
    rlhf-ray report DIR                                 DIR/report.html from what a run left
    rlhf-ray --version

Parsing imports only the config package, so `--help`, `--version` and input errors are quick
and print nothing from torch, transformers or bitsandbytes; the driver is imported to run.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata

from rlhf_ray.config.command_line import parse_run_args
from rlhf_ray.config.loading import config_to_yaml
from rlhf_ray.errors import UserInputError

USAGE = """usage: rlhf-ray run [--config PRESET_OR_YAML] [--section.key VALUE ...]
       rlhf-ray config show [--config PRESET_OR_YAML] [--section.key VALUE ...]
       rlhf-ray scale --rollout N [--address HOST:PORT] [--output_dir DIR]
       rlhf-ray report DIR
       rlhf-ray --version

  run           supervised fine-tuning, the reward model and PPO, then the gold judge's report
  config show   print the resolved config (preset + overrides) as YAML without running
  scale         set the number of rollout generators of a running job, from its next step
  report        write DIR/report.html (plots, gold rewards, samples) from a run's directory
Every setting and its default: rlhf-ray run --help"""
CONFIG_USAGE = "usage: rlhf-ray config show [--config PRESET_OR_YAML] [--section.key VALUE ...]"
REPORT_USAGE = """usage: rlhf-ray report DIR

Write DIR/report.html (and its plots in DIR/report/) from what the run in DIR left:
metrics/ppo.jsonl, summary.json, eval_samples.jsonl. DIR is a run's --output_dir."""
HELP = (["-h"], ["--help"])
SIGPIPE_EXIT = 141  # 128 + SIGPIPE, as a process the closed pipe killed would report


def main(argv: list[str] | None = None) -> int:
    try:
        return run_command(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:  # `rlhf-ray run --help | head`: the reader left, nothing is wrong
        # Python flushes stdout again at exit; into /dev/null, that says nothing either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_EXIT


def run_command(argv: list[str]) -> int:
    command = argv[:1]
    try:
        if command in HELP:
            print(USAGE)
            return 0
        if command == ["--version"]:
            print(f"rlhf-ray {metadata.version('rlhf-ray')}")
            return 0
        if command == ["run"]:
            cfg = parse_run_args(argv[1:], prog="rlhf-ray run")
            from jobs.rlhf import run  # the driver: Ray, torch and the models load from here

            return run(cfg)
        if command == ["scale"]:
            return run_scale(argv[1:])
        if command == ["report"]:
            return run_report(argv[1:])
        if argv[:2] == ["config", "show"]:
            print(config_to_yaml(parse_run_args(argv[2:], prog="rlhf-ray config show")), end="")
            return 0
        if command == ["config"]:
            return run_config_without_show(argv[1:])
    except UserInputError as err:
        print(f"rlhf-ray: error: {err}", file=sys.stderr)
        return 2
    return usage_error(f"unknown command {argv[0]!r}" if argv else "a command is required")


def usage_error(problem: str) -> int:
    print(f"{USAGE}\n\nrlhf-ray: error: {problem}", file=sys.stderr)
    return 2


def run_config_without_show(argv: list[str]) -> int:
    """`rlhf-ray config --help` prints the usage; anything else lacks `show` (the only one)."""
    if argv[:1] in HELP:
        print(CONFIG_USAGE)
        return 0
    if argv:
        return usage_error(f"unknown command 'config {argv[0]}'")
    return usage_error("rlhf-ray config needs a subcommand: show")


def run_report(argv: list[str]) -> int:
    if argv[:1] in HELP:
        print(REPORT_USAGE)
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print(f"{REPORT_USAGE}\n\nrlhf-ray: error: give one run directory", file=sys.stderr)
        return 2
    from pathlib import Path

    from rlhf_ray.run.html_report import PLOTS_DIR, REPORT_FILE, write_report

    out = Path(argv[0])
    if not (out / "config.yaml").is_file():
        print(
            f"rlhf-ray: error: {out} is not an rlhf-ray run directory: expected the "
            "--output_dir of a run, which holds config.yaml",
            file=sys.stderr,
        )
        return 2
    try:
        page = write_report(out)
    except OSError as err:  # DIR/report.html a directory, DIR/report a file, DIR read-only
        print(
            f"rlhf-ray: error: cannot write the report: {err.filename}: {err.strerror}; "
            f"expected {out} writable, with no directory named {REPORT_FILE} and no file named "
            f"{PLOTS_DIR} in it",
            file=sys.stderr,
        )
        return 2
    print(f"[report] {page}")
    return 0


def run_scale(argv: list[str]) -> int:
    from jobs.scale import NoRunningJob, TokenRefused, scale

    try:
        answer = scale(argv)
    except (NoRunningJob, TokenRefused) as err:
        print(f"rlhf-ray: error: {err}", file=sys.stderr)
        return 1
    alive = answer["generators"]
    if answer["was_auto"]:
        print("ppo.rollout_scaling auto is off for the rest of this job: the count is fixed")
    print(
        f"rollout generators of the job writing to {answer['output_dir']}: {len(alive)} now "
        f"({', '.join(alive) or 'PPO not started'}), {answer['target']} from its next step "
        f"(after step {answer['step']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
