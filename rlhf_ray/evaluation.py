"""Held-out evaluation by the gold judge: mean gold reward and head-to-head win rate.

Responses are sampled (at `eval.temperature`), not greedy: a mixture the SFT model learned
from imperfect demonstrations shows up in samples, while greedy decoding would hide it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_ray import synthetic
from rlhf_ray.config import EvalConfig, ModelConfig, QuantizationConfig
from rlhf_ray.encoding import Limits
from rlhf_ray.gold import GoldJudge
from rlhf_ray.models import load_causal_lm, to_device, use_cpus
from rlhf_ray.sampling import decode_responses, sample
from rlhf_ray.tokenizer import load_tokenizer


@dataclass(frozen=True)
class EvalJob:
    model_path: str
    model: ModelConfig
    quantization: QuantizationConfig
    eval: EvalConfig
    limits: Limits
    seed: int
    cpus: float
    gpus: float


def generate_eval_responses(job: EvalJob, prompts: list[str]) -> list[list[str]]:
    """`eval.samples_per_prompt` sampled responses per prompt: -> [prompt][sample] text."""
    use_cpus(job.cpus)
    torch.manual_seed(job.seed)  # same seed for every model: differences come from the model
    tok = load_tokenizer(job.model_path, job.model.trust_remote_code)
    model = load_causal_lm(job.model_path, job.model, job.quantization)
    model = to_device(model, job.gpus).eval()
    n = job.eval.samples_per_prompt
    flat = [p for p in prompts for _ in range(n)]
    texts = []
    for i in range(0, len(flat), job.eval.batch_size):
        chunk = flat[i : i + job.eval.batch_size]
        texts += decode_responses(tok, sample(model, tok, chunk, job.limits, job.eval.temperature))
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def ideal_responses(prompts: list[str]) -> list[list[str]]:
    """The world's ideal response for each prompt the judge knows (empty list otherwise)."""
    specs = {s.text: s for s in synthetic.all_prompts()}
    return [[synthetic.ideal_response(specs[p])] if p in specs else [] for p in prompts]


def gold_scores(judge: GoldJudge, prompts: list[str], responses: list[list[str]]):
    """[prompt][sample] gold totals, for the prompts the judge knows (others are skipped)."""
    return [
        [judge.score(p, r).total for r in rs]
        for p, rs in zip(prompts, responses, strict=True)
        if judge.knows(p)
    ]


def mean_gold(scores: list[list[float]]) -> float | None:
    flat = [s for row in scores for s in row]
    return sum(flat) / len(flat) if flat else None


def win_rate(a: list[list[float]], b: list[list[float]]) -> float | None:
    """Share of (prompt, sample) pairs where a beats b by gold score; ties count half."""
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    if not pairs:
        return None
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in pairs) / len(pairs)


def write_samples(path: Path, prompts: list[str], responses: dict[str, list[list[str]]]) -> None:
    """One JSON line per prompt with every model's responses, for reading by eye."""
    with open(path, "w", encoding="utf-8") as f:
        for i, prompt in enumerate(prompts):
            row = {"prompt": prompt, **{name: rs[i] for name, rs in responses.items()}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
