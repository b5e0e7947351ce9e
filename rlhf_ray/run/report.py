"""`summary.json`: the run's headline numbers, all measured (gold judge, held-out data)."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_ray.config import Config
from rlhf_ray.data.chat import prompt_text, response_text
from rlhf_ray.data.jsonl import read_jsonl
from rlhf_ray.data.prepare import read_rows
from rlhf_ray.run import metrics
from rlhf_ray.run.checkpoints import is_complete, phase_dir, read_metrics
from rlhf_ray.run.evaluation import gold_scores, mean_gold, win_rate
from rlhf_ray.run.judges import INDEPENDENT, OPTIMISED, judge_summary, trained_on
from rlhf_ray.train.settings import EVAL_SCORES_FILE
from rlhf_ray.world.gold_judge import GoldJudge

SUMMARY_FILE = "summary.json"


def write_summary(
    cfg: Config, out: Path, data_report: dict, evaluation: dict, seconds: dict
) -> dict:
    judge = GoldJudge()
    prompts = evaluation["prompts"]
    gold = {name: gold_scores(judge, prompts, rs) for name, rs in evaluation["responses"].items()}
    summary = {f"gold_reward_{name}": _round(mean_gold(scores)) for name, scores in gold.items()}
    summary.update(
        eval_prompts=len(prompts),
        eval_prompts_judged=sum(judge.knows(prompt_text(p)) for p in prompts),
        eval_samples_per_prompt=cfg.eval.samples_per_prompt,
    )
    if "policy" in gold and "sft" in gold:
        summary["win_rate_vs_sft"] = _round(win_rate(gold["policy"], gold["sft"]))
        summary["gap_closed"] = _gap_closed(summary)
    summary.update(judge_summary(evaluation.get("judged", {})))
    if evaluation.get("judged"):
        summary["eval_judges"] = {
            name: OPTIMISED if trained_on(cfg, name) else INDEPENDENT
            for name in evaluation["judged"]
        }
    summary.update(_reward_model_summary(cfg, out, evaluation["data_dir"], judge))
    summary.update(_ppo_summary(cfg, phase_dir(out, "ppo"), evaluation.get("policy_kl", [])))
    summary["phase_seconds"] = {**_previous_seconds(out), **seconds}
    summary["data"] = data_report
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_summary(summary: dict) -> None:
    print("\n=== rlhf-ray summary (gold judge, held-out prompts) ===")
    for key, value in summary.items():
        if key not in ("data", "eval_judges"):
            print(f"{key:>24}: {value}{_judge_label(summary, key)}")


def _judge_label(summary: dict, key: str) -> str:
    """ "  (optimised by PPO)" after a judge's figures when PPO trained on that judge."""
    for judge, kind in (summary.get("eval_judges") or {}).items():
        if key.startswith(f"{judge}_") and kind == OPTIMISED:
            return f"  ({OPTIMISED})"
    return ""


def _gap_closed(summary: dict) -> float | None:
    """(policy - sft) / (ideal - sft): the share of the SFT-to-ideal gap PPO closed."""
    sft, ideal, policy = (summary.get(f"gold_reward_{n}") for n in ("sft", "ideal", "policy"))
    if None in (sft, ideal, policy) or ideal == sft:
        return None
    return _round((policy - sft) / (ideal - sft))


def _reward_model_summary(cfg: Config, out: Path, data_dir: Path, judge: GoldJudge) -> dict:
    """Held-out pairwise accuracy against the labels, and against the gold judge's ordering."""
    reward_dir = phase_dir(out, "reward")
    if not is_complete(reward_dir):
        return {}
    result = {"rm_accuracy": _round(read_metrics(reward_dir)["eval_accuracy"])}
    if cfg.data.preference_path is None:
        result["rm_accuracy_ceiling"] = _round(1 - cfg.data.label_noise)
    pairs = read_rows(data_dir, "preferences_eval")
    scores = read_jsonl(reward_dir / EVAL_SCORES_FILE)
    agree = [
        (s["chosen"] > s["rejected"]) == _gold_prefers_chosen(judge, p)
        for p, s in zip(pairs, scores, strict=True)
        if judge.knows(prompt_text(p["prompt"]))
    ]
    if agree:
        result["rm_accuracy_gold"] = _round(sum(agree) / len(agree))
    return result


def _gold_prefers_chosen(judge: GoldJudge, pair: dict) -> bool:
    prompt = prompt_text(pair["prompt"])
    chosen, rejected = (response_text(pair[k]) for k in ("chosen", "rejected"))
    return judge.score(prompt, chosen).total > judge.score(prompt, rejected).total


def _ppo_summary(cfg: Config, policy_dir: Path, heldout_kl: list[list[float]]) -> dict:
    if not is_complete(policy_dir):
        return {}
    ppo = read_metrics(policy_dir)
    sources = (
        {"reward_model": cfg.scoring.reward_model_weight} if cfg.scoring.uses_reward_model else {}
    )
    sources |= dict(zip(cfg.scoring.functions, cfg.scoring.weights, strict=True))
    return {
        "ppo_estimator": cfg.ppo.estimator,
        "ppo_samples_per_prompt": cfg.ppo.samples_per_prompt,
        "ppo_kl_placement": "loss" if cfg.ppo.kl_in_loss else "reward",
        "ppo_reward_sources": sources,
        # KL to the reference, in nats per response: of the exported policy on the held-out
        # prompts (every sample of the evaluation phase: the mean, and the largest response),
        # and of the last training step's rollouts (training prompts, as the policy sampled them)
        **_heldout_kl(heldout_kl),
        "kl_last_step": _round(ppo[metrics.KL]),
        "ppo_best_step": ppo.get("best_step"),  # the step policy/ holds; None: the last
        "ppo_eval_judge": ppo.get("eval_judge"),  # what ranked the evaluated steps
        "ppo_tokens_per_s": _round(ppo[metrics.TOKENS_PER_S]),
        "ppo_stage_seconds": ppo.get("stage_seconds"),
        "ppo_role_busy": ppo.get("role_busy"),  # share of PPO wall time each role worked
        "ppo_rollout_generators": ppo.get(metrics.GENERATORS),  # at the last step
        "ppo_generators_last_step": _generator_stats(ppo),
    }


def _heldout_kl(per_sample: list[list[float]]) -> dict:
    """kl_heldout (mean) and kl_heldout_max over the evaluation phase's [prompt][sample] KLs."""
    flat = [kl for row in per_sample for kl in row]
    if not flat:
        return {"kl_heldout": None}
    return {"kl_heldout": _round(sum(flat) / len(flat)), "kl_heldout_max": _round(max(flat))}


def _generator_stats(ppo: dict) -> dict[str, dict]:
    """generator name -> its completions/s and policy version at the last PPO step."""
    stats: dict[str, dict] = {}
    for key, value in ppo.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "rollout" and parts[2] in metrics.GENERATOR_STATS:
            stats.setdefault(parts[1], {})[parts[2]] = _round(value)
    return stats


def _previous_seconds(out: Path) -> dict:
    """Phase times of earlier runs into the same directory (phases skipped this time)."""
    path = out / SUMMARY_FILE
    return json.loads(path.read_text()).get("phase_seconds", {}) if path.exists() else {}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
