"""Invariants of the PPO arithmetic, checked by hypothesis on many small inputs.

Each test states a property that holds for every input, not one worked example: group baselines
centre each group, GAE at gamma = lambda = 1 is returns-to-go minus values, whitening gives mean
0 and variance 1 over real tokens, and left padding of the prompt does not move the learner's
logprobs. Derandomized, with no example database, so every run tries the same inputs.
"""

from __future__ import annotations

from functools import cache

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import MistralConfig, MistralForCausalLM

from rlhf_ray.models.forward import response_logprobs
from rlhf_ray.ppo.estimators import gae_advantages, grpo_advantages, returns_to_go, rloo_advantages
from rlhf_ray.ppo.masked import masked_whiten

FAST = settings(derandomize=True, database=None, deadline=None, max_examples=60)
MODEL_RUNS = settings(derandomize=True, database=None, deadline=None, max_examples=12)

VOCAB, PAD = 32, 0
reals = st.floats(-100, 100, allow_nan=False, allow_infinity=False)


@st.composite
def grouped_rewards(draw) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards (B,) float64, group (B,) int64): 1-4 prompts of 2-5 samples each, rows in any
    order (the learner gets a step's rows from several generators)."""
    sizes = draw(st.lists(st.integers(2, 5), min_size=1, max_size=4))
    group = [g for g, size in enumerate(sizes) for _ in range(size)]
    group = draw(st.permutations(group))
    rewards = draw(st.lists(reals, min_size=len(group), max_size=len(group)))
    return torch.tensor(rewards, dtype=torch.float64), torch.tensor(group)


@st.composite
def token_batches(draw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rewards, values, mask), each (B, T): B 1-4 responses, right-padded to T 1-6 tokens,
    each with at least one real token; padding holds values as arbitrary as the real ones."""
    rows, width = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(1, width), min_size=rows, max_size=rows))
    mask = torch.tensor([[float(t < n) for t in range(width)] for n in lengths])
    cells = st.lists(reals, min_size=rows * width, max_size=rows * width)
    rewards, values = (torch.tensor(draw(cells), dtype=torch.float64) for _ in range(2))
    return rewards.view(rows, width), values.view(rows, width), mask


def per_group(values: torch.Tensor, group: torch.Tensor) -> list[torch.Tensor]:
    return [values[group == g] for g in group.unique()]


@FAST
@given(grouped_rewards())
def test_rloo_advantages_sum_to_zero_in_each_group(batch):
    rewards, group = batch
    for advantages in per_group(rloo_advantages(rewards, group), group):
        assert abs(float(advantages.sum())) < 1e-9


@FAST
@given(grouped_rewards())
def test_grpo_advantages_have_mean_zero_in_each_group(batch):
    rewards, group = batch
    for advantages in per_group(grpo_advantages(rewards, group), group):
        assert abs(float(advantages.mean())) < 1e-9


@FAST
@given(token_batches())
def test_gae_with_gamma_and_lambda_one_is_returns_to_go_minus_values(batch):
    rewards, values, mask = batch
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = returns_to_go(rewards, mask, gamma=1.0)
    real_values = torch.where(mask.bool(), values, 0)
    torch.testing.assert_close(advantages, to_go - real_values, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(returns, to_go, atol=1e-9, rtol=1e-9)


@FAST
@given(token_batches())
def test_whitened_advantages_have_mean_zero_and_variance_one_over_real_tokens(batch):
    values, _, mask = batch
    real = mask.bool()
    assume(real.sum() >= 2 and values[real].std() >= 0.1)  # else the whitening's 1e-8 shows
    white = masked_whiten(values, mask)
    assert abs(float(white[real].mean())) < 1e-6
    assert abs(float(white[real].var()) - 1) < 1e-6  # unbiased, as masked_whiten's
    assert not white[~real].any()  # padding is 0


@cache
def tiny_policy() -> MistralForCausalLM:
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        pad_token_id=PAD,
    )
    return MistralForCausalLM(config).eval()


tokens = st.integers(1, VOCAB - 1)  # any id but the pad


@MODEL_RUNS
@given(
    prompt=st.lists(tokens, min_size=1, max_size=6),
    response=st.lists(tokens, min_size=1, max_size=5),
    pad_width=st.integers(1, 6),
    temperature=st.sampled_from([0.7, 1.0]),
)
def test_learner_logprobs_do_not_change_with_the_prompts_left_padding(
    prompt, response, pad_width, temperature
):
    """The same prompt and response, alone and with `pad_width` pads on the prompt's left, as
    a shorter prompt of a batch is: the response tokens' logprobs are the same. (Rotary
    positions are shift-invariant, so on Mistral this checks that the pads are masked out, not
    the position ids, which only models with absolute positions would show.)"""

    def logprobs(pads: int) -> torch.Tensor:
        query = torch.tensor([[PAD] * pads + prompt])
        query_mask = torch.tensor([[0] * pads + [1] * len(prompt)])
        answer = torch.tensor([response])
        with torch.no_grad():
            return response_logprobs(
                tiny_policy(), query, query_mask, answer, torch.ones_like(answer), temperature
            )

    torch.testing.assert_close(logprobs(pad_width), logprobs(0), atol=1e-5, rtol=0)
