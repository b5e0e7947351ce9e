"""The rlhf-ray driver: SFT, then the reward model, then PPO, then the gold-judge report.

    python jobs/rlhf.py [--config PRESET_OR_YAML] [--output_dir DIR] [--phases sft,reward,ppo]
    ray job submit --working-dir . -- python jobs/rlhf.py --config smoke

Every phase writes `<output_dir>/<phase>/` atomically and is skipped when that exists, so a
run that stopped resumes where it was.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python jobs/rlhf.py`): import from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs import cluster, phases  # noqa: E402
from rlhf_ray.config import Config  # noqa: E402
from rlhf_ray.config.command_line import parse_run_args  # noqa: E402
from rlhf_ray.data.prepare import prepare_run  # noqa: E402
from rlhf_ray.errors import RoleFailed, RunStopped, UserInputError  # noqa: E402
from rlhf_ray.run import console, fingerprints, model_cards  # noqa: E402
from rlhf_ray.run.checkpoints import is_complete, phase_dir  # noqa: E402
from rlhf_ray.run.html_report import write_report  # noqa: E402
from rlhf_ray.run.output_dir import check_output_dir  # noqa: E402
from rlhf_ray.run.report import print_summary, write_summary  # noqa: E402
from rlhf_ray.run.run_lock import RunLock  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """`python jobs/rlhf.py [options]`, which is what `ray job submit` runs."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_run_args(argv, prog="python jobs/rlhf.py")
    except UserInputError as err:
        return report_input_error(err)
    return run(cfg)


def report_input_error(err: UserInputError) -> int:
    print(f"rlhf-ray: error: {err}", file=sys.stderr)
    return 2


def run(cfg: Config) -> int:
    out = Path(cfg.run.output_dir)
    console.set_verbose(cfg.run.verbose)  # before Ray starts: its local workers inherit it
    console.quiet_libraries()
    try:
        check_output_dir(cfg.run.output_dir)
        lock = RunLock(out)
        lock.acquire()  # one run per output directory, before anything in it changes
    except UserInputError as err:
        return report_input_error(err)
    try:
        return run_holding_the_lock(cfg, out)
    finally:
        lock.release()


def run_holding_the_lock(cfg: Config, out: Path) -> int:
    try:
        # 1. Everything the user gave is checked before any model loads or Ray starts, and what
        # the run asks of the cluster before the data is prepared: a request the cluster can
        # never hold is refused with nothing written. A cluster (RAY_ADDRESS) is joined for
        # that; a local Ray is checked as it will start, and started once the data is ready.
        phases.check_phase_inputs(cfg, out)
        redone = phases.phases_to_redo(cfg)
        joined = cluster.join_cluster()
        if joined:
            print(joined, flush=True)
        phases.check_resources(cfg, cluster.nodes_to_check(cfg.run))
        # Settings are compared with the recorded ones before the new rows replace the old
        prepared = prepare_run(
            cfg,
            before_writing=lambda rows: phases.check_recorded_settings(
                out, fingerprints.phase_settings(cfg, rows), redone=redone
            ),
        )
        phases.print_data_report(cfg, prepared.report)
        phases.warn_of_trained_eval_prompts(prepared.data_dir)
        settings = fingerprints.phase_settings(cfg, prepared.data_dir)
        if not joined:
            print(cluster.start_local(cfg.run), flush=True)
            phases.check_resources(cfg, cluster.alive_nodes())  # the node as Ray started it
    except UserInputError as err:
        return report_input_error(err)
    phases.redo_phases(cfg, out)  # only now: a run that could not start deletes nothing
    if phases.unused_settings(cfg):
        print(f"[config] not used by this run: {', '.join(phases.unused_settings(cfg))}")
    phases.save_resolved_config(cfg, out)
    seconds: dict[str, float] = {}

    # 2. The three phases, each skipped when its complete output exists.
    for name, run_phase in (
        ("sft", phases.train_sft),
        ("reward", phases.train_reward),
        ("ppo", phases.train_ppo),
    ):
        if name not in cfg.run.phases:
            continue
        if name in phases.unused_phases(cfg):
            print(f"[{name}] skipped: {phases.unused_phases(cfg)[name]}", flush=True)
            continue
        if is_complete(phase_dir(out, name)):
            print(f"[{name}] complete output in {phase_dir(out, name)}; skipped")
            continue
        fingerprints.write_record(out, name, settings[name])  # what later runs compare with
        start = time.time()
        try:
            run_phase(cfg, prepared)
        except RunStopped as stopped:
            print(f"rlhf-ray: {stopped}", file=sys.stderr, flush=True)
            return stopped.exit_code
        except UserInputError as err:  # found only once the phase started (a PPO checkpoint)
            return report_input_error(err)
        except RoleFailed as failed:
            print(
                f"rlhf-ray: error in the {name} phase: {failed}\nCompleted phases and this "
                "phase's checkpoints are kept: run the same command again to continue from them.",
                file=sys.stderr,
                flush=True,
            )
            return 1
        seconds[name] = round(time.time() - start, 1)
        print(f"[{name}] done in {seconds[name]:.1f}s", flush=True)
        model_cards.write_cards(cfg, out, prepared.report)

    # 3. Measure every model there is with the gold judge, on held-out prompts.
    if not cfg.run.evaluate:
        print("[eval] skipped (run.evaluate is false): no summary.json this time", flush=True)
        print(f"[report] {write_report(out)}", flush=True)
        return 0
    start = time.time()
    evaluation = phases.evaluate(cfg, prepared)
    seconds["eval"] = round(time.time() - start, 1)
    summary = write_summary(cfg, out, prepared.report, evaluation, seconds)
    model_cards.write_cards(cfg, out, prepared.report, summary)
    print_summary(summary)
    print(f"[report] {write_report(out)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
