"""The gold judge's report for every estimator on one preset, side by side in one run.

    .venv/bin/python bench/estimators.py [--config default] [--out runs/bench-estimators]
        [--only gae rloo ...] [--seed N]

SFT and the reward model are trained once (the `gae` run, which is the preset as it is); every
other run copies them and trains only its PPO phase, so the rows differ only in how PPO learns
and what rewards it: the estimators on the learned reward model, and the oracle run on the gold
judge itself (`scoring.reward_model_weight 0`, `scoring.functions gold_reward`), and the
`-overlap` runs with the next batch generated during the update. `--seed N` repeats it all with
`run.seed N` (its own SFT and reward model) under `<out>/seed-N`. Each row is the
run's own `summary.json` (win rate vs SFT, gap closed, KL, seconds). Writes
`<out>/estimators.json` and prints a Markdown table (docs/estimators.md holds the last one).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rlhf_ray.run import metrics  # noqa: E402 (after the checkout is on the path)
from rlhf_ray.run.trackers import read_metrics_log  # noqa: E402

GOLD = "rlhf_ray.world.gold_judge:gold_reward"
GROUPS = ["--ppo.samples_per_prompt", "4"]  # 128 rollouts = 32 prompts x 4 samples
RUNS = {
    "gae": [],
    "rloo": ["--ppo.estimator", "rloo", *GROUPS],
    "grpo": ["--ppo.estimator", "grpo", *GROUPS],
    "reinforce++": ["--ppo.estimator", "reinforce++"],
    "gae-oracle": ["--scoring.reward_model_weight", "0", "--scoring.functions", GOLD],
    "gae-overlap": ["--ppo.overlap", "true"],
    "rloo-overlap": ["--ppo.estimator", "rloo", *GROUPS, "--ppo.overlap", "true"],
    # issue 27: the update's epochs stop once a minibatch's approx-KL passes 0.05; then also an
    # adaptive KL coefficient (Ziegler et al. 2019) aiming at 0.4 nats a response
    "gae-target-kl": ["--ppo.target_kl", "0.05"],
    "gae-adaptive-kl": [
        *("--ppo.target_kl", "0.05", "--ppo.kl_target", "0.4", "--ppo.kl_horizon", "1280")
    ],
}
SHARED = ("base", "sft", "reward", "data", "phase_settings/base.json", "phase_settings/sft.json")
SHARED += ("phase_settings/reward.json",)


def run(config: str, out: Path, extra: list[str]) -> dict:
    command = [sys.executable, "jobs/rlhf.py", "--config", config, "--output_dir", str(out)]
    command += ["--run.progress_bar", "false", *extra]
    start = time.time()
    subprocess.run(command, cwd=REPO, check=True)
    summary = json.loads((out / "summary.json").read_text())
    step_kl = [row[metrics.KL] for row in read_metrics_log(out, "ppo")]
    return {
        "command": " ".join(command[1:]),
        "wall_s": round(time.time() - start, 1),
        "max_step_kl": max(step_kl),
        "steps_kl_over_1_5": sum(kl > 1.5 for kl in step_kl),
        **summary,
    }


def share_first_phases(source: Path, out: Path) -> None:
    """SFT and reward outputs (with their settings records) of the first run, for another."""
    for name in SHARED:
        if (source / name).is_dir():
            shutil.copytree(source / name, out / name)
        elif (source / name).exists():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, out / name)


def table(results: dict) -> str:
    rows = [
        "| run | estimator | rewarded by | win rate vs SFT | gap closed | held-out KL "
        "| max step KL (steps > 1.5) | best step | PPO s | PPO tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        sources = ", ".join(
            f"{k.split(':')[-1]} x{w:g}" for k, w in r["ppo_reward_sources"].items()
        )
        rows.append(
            f"| {name} | {r['ppo_estimator']} (k={r['ppo_samples_per_prompt']}, KL in "
            f"{r['ppo_kl_placement']}) | {sources} | {r['win_rate_vs_sft']:.3f} | "
            f"{r['gap_closed']:.3f} | {r['kl_heldout']:.3f} | {r['max_step_kl']:.2f} "
            f"({r['steps_kl_over_1_5']}) | {r['ppo_best_step']} | {r['phase_seconds']['ppo']:.0f} "
            f"| {r['ppo_tokens_per_s']:.0f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-estimators")
    parser.add_argument("--only", nargs="*", default=list(RUNS)[:5], choices=list(RUNS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.seed:
        args.out = args.out / f"seed-{args.seed}"
    args.out.mkdir(parents=True, exist_ok=True)
    first = args.out / "gae"
    results = {}
    for name in args.only:
        out = args.out / name
        if name != "gae":
            shutil.rmtree(out, ignore_errors=True)
            share_first_phases(first, out)
        results[name] = run(args.config, out, [*RUNS[name], "--run.seed", str(args.seed)])
        (args.out / "estimators.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
