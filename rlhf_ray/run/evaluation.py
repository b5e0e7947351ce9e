"""Held-out evaluation by the gold judge: mean gold reward and head-to-head win rate.

Responses are sampled (at `eval.temperature`), not greedy: a mixture the SFT model learned
from imperfect demonstrations shows up in samples, while greedy decoding would hide it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_ray.config import EvalConfig
from rlhf_ray.data.chat import Prompt, prompt_text
from rlhf_ray.data.encoding import Limits
from rlhf_ray.data.jsonl import write_jsonl
from rlhf_ray.data.tokenizer import load_tokenizer
from rlhf_ray.models.loading import FrozenModelSettings, load_frozen_causal_lm
from rlhf_ray.models.sampling import decode_responses, sample
from rlhf_ray.run.console import quiet_libraries
from rlhf_ray.world import assistant_world
from rlhf_ray.world.gold_judge import GoldJudge


@dataclass(frozen=True)
class EvalSettings:
    model: FrozenModelSettings  # the model sampled from (base, SFT or policy)
    eval: EvalConfig
    limits: Limits
    seed: int  # the same for every model: differences in the samples come from the model


def generate_eval_responses(settings: EvalSettings, prompts: list[Prompt]) -> list[list[str]]:
    """`eval.samples_per_prompt` sampled responses per prompt: -> [prompt][sample] text."""
    quiet_libraries()
    model = load_frozen_causal_lm(settings.model)
    torch.manual_seed(settings.seed)
    tok = load_tokenizer(settings.model.path, settings.model.model.trust_remote_code)
    n, batch_size = settings.eval.samples_per_prompt, settings.eval.batch_size
    flat = [p for p in prompts for _ in range(n)]
    texts = []
    for i in range(0, len(flat), batch_size):
        samples, _ = sample(
            model, tok, flat[i : i + batch_size], settings.limits, settings.eval.temperature
        )
        texts += decode_responses(tok, samples)
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def ideal_responses(prompts: list[Prompt]) -> list[list[str]]:
    """The world's ideal response for each prompt the judge knows (empty list otherwise)."""
    specs = {s.text: s for s in assistant_world.all_prompts()}
    texts = [prompt_text(p) for p in prompts]
    return [[assistant_world.ideal_response(specs[t])] if t in specs else [] for t in texts]


def gold_scores(judge: GoldJudge, prompts: list[Prompt], responses: list[list[str]]):
    """[prompt][sample] gold totals, for the prompts the judge knows (others are skipped); a
    conversation is judged by its last user message."""
    texts = [prompt_text(p) for p in prompts]
    return [
        [judge.score(t, r).total for r in rs]
        for t, rs in zip(texts, responses, strict=True)
        if judge.knows(t)
    ]


def mean_gold(scores: list[list[float]]) -> float | None:
    flat = [s for row in scores for s in row]
    return sum(flat) / len(flat) if flat else None


def win_rate(challenger: list[list[float]], baseline: list[list[float]]) -> float | None:
    """Share of (prompt, sample) pairs where challenger beats baseline by gold score; ties
    count half. Both are [prompt][sample] scores."""
    pairs = [
        (mine, theirs)
        for row_mine, row_theirs in zip(challenger, baseline, strict=True)
        for mine, theirs in zip(row_mine, row_theirs, strict=True)
    ]
    if not pairs:
        return None
    wins = sum(1.0 if mine > theirs else 0.5 if mine == theirs else 0.0 for mine, theirs in pairs)
    return wins / len(pairs)


def write_samples(path: Path, prompts: list[Prompt], responses: dict[str, list[list[str]]]) -> None:
    """One JSON line per prompt with every model's responses, for reading by eye."""
    write_jsonl(
        path,
        (
            {"prompt": prompt, **{name: texts[i] for name, texts in responses.items()}}
            for i, prompt in enumerate(prompts)
        ),
    )
