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

# after the checkout is on the path
import torch  # noqa: E402

from rlhf_ray.config.command_line import parse_run_args  # noqa: E402
from rlhf_ray.data.jsonl import read_jsonl  # noqa: E402
from rlhf_ray.data.prepare import limits_of  # noqa: E402
from rlhf_ray.models.loading import FrozenModelSettings  # noqa: E402
from rlhf_ray.run import metrics  # noqa: E402
from rlhf_ray.run.best_step import LAST_DIR  # noqa: E402
from rlhf_ray.run.evaluation import (  # noqa: E402
    EvalSettings,
    generate_eval_responses,
    gold_scores,
    mean_gold,
    win_rate,
)
from rlhf_ray.run.trackers import read_metrics_log  # noqa: E402
from rlhf_ray.world.gold_judge import GoldJudge  # noqa: E402

GOLD = "rlhf_ray.world.gold_judge:gold_reward"
# 128 rollouts = 32 prompts x 4 samples; beta fixed at 0.1, as rloo and grpo were measured at
# their best (the preset's adaptive beta made rloo worse: docs/estimators.md)
GROUPS = ["--ppo.samples_per_prompt", "4", "--ppo.kl_target", "0"]
RUNS = {
    "gae": [],
    "gae-fixed-kl": ["--ppo.kl_target", "0"],  # the preset before its adaptive KL coefficient
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
    wall_s = round(time.time() - start, 1)
    summary = json.loads((out / "summary.json").read_text())
    # (rows of the roles' busy shares alone are logged between steps)
    step_kl = [row[metrics.KL] for row in read_metrics_log(out, "ppo") if metrics.KL in row]
    return {
        "command": " ".join(command[1:]),
        "wall_s": wall_s,
        "max_step_kl": max(step_kl),
        "steps_kl_over_1_5": sum(kl > 1.5 for kl in step_kl),
        **last_step_figures(parse_run_args(command[2:]), out, summary),
        **summary,
    }


def last_step_figures(cfg, out: Path, summary: dict) -> dict:
    """The gold judge's win rate and gap closed of `policy-last/` (the last step), sampled as
    the evaluation phase samples `policy/` (the best evaluated step): the same prompts, seed and
    settings, against the SFT samples that phase wrote. The same as policy/'s where the last
    step was the best (policy-last/ is then a link)."""
    last = out / LAST_DIR
    if last.is_symlink():
        return {
            "win_rate_last": summary["win_rate_vs_sft"],
            "gap_closed_last": summary["gap_closed"],
        }
    torch.set_num_threads(1)  # as in the evaluation phase's Ray task (rollout_cpus < 1)
    rows = read_jsonl(out / "eval_samples.jsonl")
    prompts = [row["prompt"] for row in rows]
    res = cfg.resources
    model = FrozenModelSettings(str(last), cfg.model, cfg.quantization, res.rollout_cpus, 0)
    settings = EvalSettings(model, cfg.eval, limits_of(cfg.data), cfg.run.seed)
    judge = GoldJudge()
    policy = gold_scores(judge, prompts, generate_eval_responses(settings, prompts).texts)
    sft = gold_scores(judge, prompts, [row["sft"] for row in rows])
    ideal = summary["gold_reward_ideal"]
    sft_mean = summary["gold_reward_sft"]
    return {
        "win_rate_last": win_rate(policy, sft),
        "gap_closed_last": (mean_gold(policy) - sft_mean) / (ideal - sft_mean),
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
        "| best step | last step: win rate / gap closed | max step KL (steps > 1.5) | PPO s "
        "| PPO tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        sources = ", ".join(
            f"{k.split(':')[-1]} x{w:g}" for k, w in r["ppo_reward_sources"].items()
        )
        rows.append(
            f"| {name} | {r['ppo_estimator']} (k={r['ppo_samples_per_prompt']}, KL in "
            f"{r['ppo_kl_placement']}) | {sources} | {r['win_rate_vs_sft']:.3f} | "
            f"{r['gap_closed']:.3f} | {r['kl_heldout']:.3f} | {r['ppo_best_step']} | "
            f"{r['win_rate_last']:.3f} / {r['gap_closed_last']:.3f} | {r['max_step_kl']:.2f} "
            f"({r['steps_kl_over_1_5']}) | {r['phase_seconds']['ppo']:.0f} "
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
