"""The default preset's PPO update on one learner rank against two, side by side.

    .venv/bin/python bench/learner_ranks.py --models runs/bench-models [--rounds 3] [--steps 8]

`--models` is a run of the default preset with its SFT and reward phases done, e.g.
`rlhf-ray run --output_dir runs/bench-models --phases sft,reward --run.evaluate false`.
Each variant runs the default preset's PPO steps (128 rollouts, four epochs of 32-row
minibatches, GAE with a critic) in its own process on a local Ray of 2 CPUs, or on two
simulated nodes of one CPU each (`--nodes 2`: ray.cluster_utils.Cluster, each node with its
own object store, so the two ranks' gradients cross between nodes); the variants alternate
within a round. Reported: the median over rounds of each run's median steady-state step and
learn stage (the first step, with its warm-up, left out), and the learn-stage ratio against
the first variant. Nothing here is asserted in a test; the table is in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# name -> the settings it adds to the default preset (each rank's CPUs and threads)
VARIANTS = {
    "1 rank x 2 threads (the preset)": [],
    "2 ranks x 1 thread": [
        *("--resources.learner_workers", "2", "--resources.learner_cpus", "0.5"),
        *("--resources.learner_threads", "1", "--resources.learner_placement", "spread"),
    ],
}


def one_run(models: Path, variant: str, steps: int, nodes: int) -> dict:
    """The variant's PPO steps in this process -> per-step seconds and learn-stage seconds."""
    from bench.ray_setup import timed_ppo_steps
    from rlhf_ray.config.command_line import parse_run_args

    args = ["--output_dir", str(models), "--ppo.steps", str(steps), *VARIANTS[variant]]
    cfg = parse_run_args([*args, "--ppo.checkpoint_every", "0"])
    timed = timed_ppo_steps(cfg, models, nodes)
    step_s, learn_s = timed.seconds, [times["learn"] for times in timed.stages]
    return {"step_s": statistics.median(step_s[1:]), "learn_s": statistics.median(learn_s[1:])}


def report(results: dict[str, list[dict]], nodes: int) -> str:
    first = next(iter(results))
    learn = {v: statistics.median(r["learn_s"] for r in runs) for v, runs in results.items()}
    lines = [
        f"Nodes: {nodes} (2 CPUs in all). Medians over {len(results[first])} rounds.",
        "",
        "| learner | step (s) | learn (s) | learn-stage speed vs the first |",
        "|---|---|---|---|",
    ]
    for variant, runs in results.items():
        step = statistics.median(r["step_s"] for r in runs)
        ratio = learn[first] / learn[variant]
        lines.append(f"| {variant} | {step:.2f} | {learn[variant]:.2f} | {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=1, help="simulated nodes (2 CPUs in all)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one, in-process
    args = parser.parse_args()
    models = args.models.resolve()
    if args.variant:
        print(json.dumps(one_run(models, args.variant, args.steps, args.nodes)))
        return
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for round_ in range(args.rounds):
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--models", str(models), "--variant", variant]
            command += ["--steps", str(args.steps), "--nodes", str(args.nodes)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            results[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}: {variant} {results[variant][-1]}", flush=True)
    print(report(results, args.nodes))


if __name__ == "__main__":
    main()
