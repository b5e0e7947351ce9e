"""Rows in TRL's formats drawn from the synthetic world (`assistant_world.py`).

Evaluation prompts are held out: no training row (SFT, preference or RL) uses their text, so
the gold reward on them measures generalisation, not recall of a training string. Each is a new
phrasing of a subject training teaches (`split_prompts`).
"""

from __future__ import annotations

import random
from collections import Counter

from rlhf_ray.config import DataConfig
from rlhf_ray.errors import ConfigError
from rlhf_ray.world import assistant_world
from rlhf_ray.world.assistant_world import PromptSpec
from rlhf_ray.world.gold_judge import GoldJudge


def split_prompts(num_eval: int, seed: int) -> tuple[list[PromptSpec], list[PromptSpec]]:
    """(train specs, eval specs): a seeded shuffle of the world, `num_eval` held out, each a
    new phrasing of something training teaches (`_taught_by`): a held-out "What is the capital
    of Poland?" keeps another phrasing about Poland in training. A capital no training row
    names cannot be known, so a split that held out every phrasing of it measured the split's
    luck, not RLHF (seed 1 once held out all four about Poland, 32 of 512 samples).

    `DataConfig` has checked that `num_eval` <= `assistant_world.max_eval_prompts()`, which
    this rule allows (up to 142 of the 190 prompts could be held out)."""
    specs = assistant_world.all_prompts()
    random.Random(seed).shuffle(specs)
    left_in_training = Counter(_taught_by(s) for s in specs)
    held_out = []
    for spec in specs:
        if len(held_out) == num_eval:
            break
        if left_in_training[_taught_by(spec)] > 1:
            left_in_training[_taught_by(spec)] -= 1
            held_out.append(spec)
    return [s for s in specs if s not in held_out], held_out


def _taught_by(spec: PromptSpec) -> str:
    """What training must show for a held-out prompt to be answerable: its subject (a
    country's capital, a word's opposite, a topic's tip, a harm), or for a question nobody can
    answer the kind itself (one answer fits them all)."""
    return spec.kind if spec.kind == "unknowable" else f"{spec.kind}:{spec.subject}"


def sft_rows(specs: list[PromptSpec], cfg: DataConfig, rng: random.Random) -> list[dict]:
    """Demonstrations, a `flawed_fraction` share of them flawed on purpose."""
    rows = []
    for _ in range(cfg.num_sft):
        spec = rng.choice(specs)
        completion = assistant_world.sample_response(spec, cfg.flawed_fraction, rng)
        rows.append({"prompt": spec.text, "completion": completion})
    return rows


def preference_rows(
    specs: list[PromptSpec], count: int, cfg: DataConfig, judge: GoldJudge, rng: random.Random
) -> list[dict]:
    """Pairs of demonstrator responses labelled by the gold judge, flipped at `label_noise`."""
    if cfg.flawed_fraction == 0:
        raise ConfigError(
            "data.flawed_fraction=0.0: synthetic preference pairs compare flawed and ideal "
            "responses; expected > 0, or give your own pairs with data.preference_path"
        )
    rows, attempts = [], 0
    while len(rows) < count:
        attempts += 1
        if attempts > 1000 * count:  # only a vanishingly small flawed_fraction gets here
            raise ConfigError(
                f"data.flawed_fraction={cfg.flawed_fraction}: too few flawed responses to "
                f"make {count} non-tied preference pairs; expected a larger fraction"
            )
        spec = rng.choice(specs)
        a = assistant_world.sample_response(spec, cfg.flawed_fraction, rng, for_preferences=True)
        b = assistant_world.sample_response(spec, cfg.flawed_fraction, rng, for_preferences=True)
        scores = (judge.score(spec.text, a).total, judge.score(spec.text, b).total)
        pair = labelled_pair(spec.text, (a, b), scores, cfg.label_noise, rng)
        rows += [pair] if pair else []
    return rows


def labelled_pair(
    prompt: str, responses: tuple[str, str], scores: tuple[float, float], label_noise: float, rng
) -> dict | None:
    """{prompt, chosen, rejected}: the higher-scored response chosen, the labels flipped at
    `label_noise` (an rng draw only for a pair that is kept); None for a tie, which teaches
    nothing about preference."""
    if scores[0] == scores[1]:
        return None
    chosen, rejected = responses if scores[0] > scores[1] else responses[::-1]
    if rng.random() < label_noise:
        chosen, rejected = rejected, chosen
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def prompt_rows(specs: list[PromptSpec], count: int, rng: random.Random) -> list[dict]:
    return [{"prompt": rng.choice(specs).text} for _ in range(count)]


def eval_rows(specs: list[PromptSpec]) -> list[dict]:
    """Held-out prompts with the ideal response (kept for the report, never trained on)."""
    return [{"prompt": s.text, "ideal": assistant_world.ideal_response(s)} for s in specs]
