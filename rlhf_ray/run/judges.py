"""Judges of the held-out samples besides the gold judge, for users' own data (which the gold
judge does not know): the run's reward model and reward functions (`eval.judges`).

Each judge scores every held-out sample of base, SFT and policy; `summary.json` gets, per judge,
the mean score of each model (`<judge>_reward_<model>`) and the policy's win rate against SFT
(`<judge>_win_rate_vs_sft`), paired by prompt and sample as the gold judge's win rate is. A
judge PPO trained on (the reward model, a function in scoring.functions) is marked as such: the
policy was optimised to please it, so its verdict is the proxy's, not an independent one.

Responses are judged as text: the reward model reads each prompt + response encoded as its
training pairs were (a sampled response without EOS gets one, as a completion in the data has).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_ray.config import Config
from rlhf_ray.data.chat import Prompt, assistant_message, is_conversational
from rlhf_ray.data.encoding import completion_ids, pad_right, prompt_ids
from rlhf_ray.data.limits import Limits
from rlhf_ray.data.tokenizer import load_tokenizer
from rlhf_ray.errors import ConfigError
from rlhf_ray.models.forward import sequence_scores
from rlhf_ray.models.loading import FrozenModelSettings, device_of, load_frozen_scalar_model
from rlhf_ray.ppo.reward_functions import call_reward_function, import_reward_function
from rlhf_ray.run.checkpoints import is_complete
from rlhf_ray.run.console import quiet_libraries
from rlhf_ray.run.evaluation import win_rate

REWARD_MODEL = "reward_model"
MODELS = ("base", "sft", "policy")  # the models judged (not "ideal": the synthetic world's)
OPTIMISED = "optimised by PPO"
INDEPENDENT = "not trained on"


def judges_of(cfg: Config, reward_dir: Path | None = None) -> tuple[tuple[str, ...], str | None]:
    """(the judges this run uses, a note naming any of eval.judges left out and why).
    `reward_dir`: where the run's reward model should be, when checked for a complete one (a
    run of `--phases sft` evaluates its SFT model with none trained yet)."""
    if REWARD_MODEL not in cfg.eval.judges:
        return cfg.eval.judges, None
    kept = tuple(j for j in cfg.eval.judges if j != REWARD_MODEL)
    if not cfg.scoring.uses_reward_model:
        return kept, "eval.judges: reward_model left out: this run has no reward model"
    if reward_dir is not None and not is_complete(reward_dir):
        return kept, f"eval.judges: reward_model left out: no trained reward model in {reward_dir}"
    return cfg.eval.judges, None


def check_judges(judges: tuple[str, ...]) -> None:
    """Every reward function among `judges` imports and takes the reward call (ConfigError)."""
    for judge in judges:
        if judge == REWARD_MODEL:
            continue
        try:
            import_reward_function(judge)
        except ConfigError as err:  # said of scoring.functions: the same check, another key
            raise ConfigError(str(err).replace("scoring.functions:", "eval.judges:", 1)) from None


def trained_on(cfg: Config, judge: str) -> bool:
    """Whether PPO's reward included `judge` (so its scores are what PPO optimised)."""
    if judge == REWARD_MODEL:
        return cfg.scoring.uses_reward_model
    return judge in cfg.scoring.functions


@dataclass(frozen=True)
class JudgeSettings:
    judges: tuple[str, ...]
    reward_model: FrozenModelSettings | None  # None when no judge is the reward model
    tokenizer_path: str  # for reward functions' completion ids: the SFT model's tokenizer
    trust_remote_code: bool
    limits: Limits
    batch_size: int


def judge_responses(
    settings: JudgeSettings, prompts: list[Prompt], responses: dict[str, list[list[str]]]
) -> dict[str, dict[str, list[list[float]]]]:
    """judge -> model -> [prompt][sample] score of each response of `responses` (model ->
    [prompt][sample] text)."""
    quiet_libraries()
    tok = load_tokenizer(settings.tokenizer_path, settings.trust_remote_code)
    rm = load_frozen_scalar_model(settings.reward_model) if settings.reward_model else None
    scored: dict[str, dict[str, list[list[float]]]] = {j: {} for j in settings.judges}
    for model, texts in responses.items():
        flat_prompts = [p for p, rs in zip(prompts, texts, strict=True) for _ in rs]
        flat = [r for rs in texts for r in rs]
        completions = [
            assistant_message(r) if is_conversational(p) else r
            for p, r in zip(flat_prompts, flat, strict=True)
        ]
        for judge in settings.judges:
            if judge == REWARD_MODEL:
                values = _reward_model_scores(rm, tok, settings, flat_prompts, completions)
            else:
                ids = [
                    completion_ids(tok, p, c, settings.limits)
                    for p, c in zip(flat_prompts, completions, strict=True)
                ]
                function = import_reward_function(judge)
                values = call_reward_function(judge, function, flat_prompts, completions, ids)
            scored[judge][model] = _unflatten(values.tolist(), texts)
    return scored


@torch.no_grad()
def _reward_model_scores(model, tok, settings: JudgeSettings, prompts, completions) -> torch.Tensor:
    rows = [
        prompt_ids(tok, p, settings.limits) + completion_ids(tok, p, c, settings.limits)
        for p, c in zip(prompts, completions, strict=True)
    ]
    parts = []
    for i in range(0, len(rows), settings.batch_size):
        ids, mask = pad_right(rows[i : i + settings.batch_size], tok.pad_token_id)
        device = device_of(model)
        parts.append(sequence_scores(model, ids.to(device), mask.to(device)).cpu().float())
    return torch.cat(parts) if parts else torch.zeros(0)


def _unflatten(values: list[float], shape: list[list[str]]) -> list[list[float]]:
    out, i = [], 0
    for row in shape:
        out.append(values[i : i + len(row)])
        i += len(row)
    return out


def judge_summary(scores: dict[str, dict[str, list[list[float]]]]) -> dict:
    """`<judge>_reward_<model>`: each judge's mean score of each model's samples, and
    `<judge>_win_rate_vs_sft`: the share of (prompt, sample) pairs where the policy's response
    scores above SFT's, ties counting half."""
    summary = {}
    for judge, by_model in scores.items():
        for model in MODELS:
            if model in by_model:
                flat = [s for row in by_model[model] for s in row]
                summary[f"{judge}_reward_{model}"] = _mean(flat)
        if "policy" in by_model and "sft" in by_model:
            rate = win_rate(by_model["policy"], by_model["sft"])
            summary[f"{judge}_win_rate_vs_sft"] = None if rate is None else round(rate, 4)
    return summary


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None
