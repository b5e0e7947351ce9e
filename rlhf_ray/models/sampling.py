"""Sampling responses from a causal LM: the one code path for rollouts and for evaluation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
)

from rlhf_ray.data.chat import Prompt
from rlhf_ray.data.encoding import Limits, pad_left, prompt_ids
from rlhf_ray.models.loading import without_adapter
from rlhf_ray.models.token_math import logprobs_from_logits, truncate_after_eos
from rlhf_ray.ppo.messages import Samples

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def generation_config(
    tok: PreTrainedTokenizerBase, max_new_tokens: int, temperature: float
) -> GenerationConfig:
    """Plain ancestral sampling at `temperature`: no top-k/top-p, so the logprobs PPO computes
    from logits / temperature are those of the distribution actually sampled from."""
    return GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


@contextmanager
def _no_model_generation_defaults(model: PreTrainedModel) -> Iterator[None]:
    """Hide the model's own `generation_config` for the duration of one `generate` call.

    transformers fills every setting our GenerationConfig leaves unset (None) from the model's
    `generation_config.json`: a hub model that ships repetition_penalty, min_p, top_k,
    no_repeat_ngram_size, bad_words_ids or suppress_tokens would then sample from a
    distribution other than softmax(logits / temperature), the one PPO's logprobs assume.
    With an empty one in its place only our settings and the library's neutral defaults apply.
    """
    inner = without_adapter(model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


class _SampledTokenLogprobs(LogitsProcessor):
    """Keeps log p(token) of every token `generate` samples, under softmax(logits / temperature).

    Custom processors run before generate's temperature warper, so `scores` here are the raw
    logits. The token drawn from step t's distribution is only known at step t+1 (as the last
    input id), so one step's (B, V) logits wait for it: memory stays (B, V) + (B, R), where
    `output_logits` would keep (B, R, V). This replaces a second forward pass over every
    sampled token (the generator's logprobs for the PPO ratio); tests/test_sampling.py checks
    that both give the same numbers.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.pending: torch.Tensor | None = None  # (B, V) float32 logits of the last step
        self.steps: list[torch.Tensor] = []  # each (B,) float32

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self._take(input_ids[:, -1])
        self.pending = scores.float()
        return scores

    def _take(self, tokens: torch.Tensor) -> None:  # (B,) int64, the tokens sampled last
        logp = logprobs_from_logits(
            self.pending.unsqueeze(1), tokens.unsqueeze(1), self.temperature
        )
        self.steps.append(logp.squeeze(1))

    def logprobs(self, generated: torch.Tensor) -> torch.Tensor:
        """(B, R) generated ids -> (B, R) float32 logprobs of them."""
        self._take(generated[:, -1])
        if len(self.steps) != generated.shape[1]:
            raise RuntimeError(f"{len(self.steps)} sampling steps for {generated.shape[1]} tokens")
        return torch.stack(self.steps, dim=1)


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    limits: Limits,
    temperature: float,
) -> tuple[Samples, torch.Tensor]:
    """Responses to `prompts`, and (B, R) float32 logprobs of the response tokens at
    `temperature` as they were sampled (0 after the first EOS)."""
    device = next(model.parameters()).device
    query, query_mask = pad_left([prompt_ids(tok, p, limits) for p in prompts], tok.pad_token_id)
    query, query_mask = query.to(device), query_mask.to(device)
    recorder = _SampledTokenLogprobs(temperature)
    with _no_model_generation_defaults(model):
        out = model.generate(
            input_ids=query,
            attention_mask=query_mask,
            generation_config=generation_config(tok, limits.max_completion_tokens, temperature),
            logits_processor=LogitsProcessorList([recorder]),
        )
    generated = out[:, query.shape[1] :]
    logprobs = recorder.logprobs(generated)
    response, mask, has_eos = truncate_after_eos(generated, tok.eos_token_id, tok.pad_token_id)
    return Samples(query, query_mask, response, mask, has_eos), logprobs * mask


def decode_responses(tok: PreTrainedTokenizerBase, samples: Samples) -> list[str]:
    """Response texts without EOS or padding."""
    texts = []
    for ids, mask in zip(samples.response, samples.response_mask, strict=True):
        real = ids[mask.bool()].tolist()
        texts.append(tok.decode(real, skip_special_tokens=True).strip())
    return texts
