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
from rlhf_ray.models.forward import response_logprobs
from rlhf_ray.models.loading import FrozenModelSettings, device_of, load_frozen_causal_lm
from rlhf_ray.models.sampling import decode_responses, sample
from rlhf_ray.ppo.messages import Samples
from rlhf_ray.run.console import quiet_libraries
from rlhf_ray.world import assistant_world
from rlhf_ray.world.gold_judge import GoldJudge


@dataclass(frozen=True)
class EvalSettings:
    model: FrozenModelSettings  # the model sampled from (base, SFT or policy)
    eval: EvalConfig
    limits: Limits
    seed: int  # the same for every model: differences in the samples come from the model
    # the model the samples' KL is measured to (the SFT model, PPO's reference, for the policy)
    reference: FrozenModelSettings | None = None


@dataclass(frozen=True)
class EvalResponses:
    texts: list[list[str]]  # [prompt][sample] decoded responses
    # [prompt][sample] KL to `reference` in nats per response: the sum over the response's
    # tokens of logp_model - logp_reference at eval.temperature (k1, as objective/kl); None
    # without a reference
    kl: list[list[float]] | None


def generate_eval_responses(settings: EvalSettings, prompts: list[Prompt]) -> EvalResponses:
    """`eval.samples_per_prompt` sampled responses per prompt, and their KL to the reference."""
    quiet_libraries()
    model = load_frozen_causal_lm(settings.model)
    # loaded before the seed is set: building a model draws from the random stream, and the
    # samples must be the same with a reference or without
    reference = load_frozen_causal_lm(settings.reference) if settings.reference else None
    torch.manual_seed(settings.seed)
    tok = load_tokenizer(settings.model.path, settings.model.model.trust_remote_code)
    n, batch_size = settings.eval.samples_per_prompt, settings.eval.batch_size
    flat = [p for p in prompts for _ in range(n)]
    texts, kl = [], []
    for i in range(0, len(flat), batch_size):
        samples, logprobs = sample(
            model, tok, flat[i : i + batch_size], settings.limits, settings.eval.temperature
        )
        texts += decode_responses(tok, samples)
        if reference is not None:
            kl += kl_to_reference(reference, samples, logprobs, settings.eval.temperature)
    return EvalResponses(_per_prompt(texts, n), _per_prompt(kl, n) if reference else None)


@torch.no_grad()
def kl_to_reference(reference, samples: Samples, logprobs: torch.Tensor, temperature: float):
    """-> [B] summed k1 KL of each response: its (B, R) sampled `logprobs` (0 on padding) minus
    the reference's logprobs of the same tokens."""
    device = device_of(reference)
    tensors = (samples.query, samples.query_mask, samples.response, samples.response_mask)
    ref = response_logprobs(reference, *(t.to(device) for t in tensors), temperature)
    mask = samples.response_mask.cpu()
    return ((logprobs.cpu() - ref.float().cpu()) * mask).sum(1).tolist()


def _per_prompt(flat: list, n: int) -> list[list]:
    """[prompt * n] -> [prompt][n]."""
    return [flat[i : i + n] for i in range(0, len(flat), n)]


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


def write_samples(path: Path, prompts: list[Prompt], columns: dict[str, list[list]]) -> None:
    """One JSON line per prompt with every column's [prompt][sample] values (each model's
    responses, the policy's KL per response), for reading by eye."""
    write_jsonl(
        path,
        (
            {"prompt": prompt, **{name: values[i] for name, values in columns.items()}}
            for i, prompt in enumerate(prompts)
        ),
    )
