"""Sampling draws from softmax(logits / temperature), whatever the model's own defaults say."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from peft import TaskType
from transformers import GenerationConfig

from rlhf_ray.data.prepare import limits_of
from rlhf_ray.data.tokenizer import load_tokenizer
from rlhf_ray.models.adapters import add_lora
from rlhf_ray.models.forward import response_logits
from rlhf_ray.models.loading import load_causal_lm
from rlhf_ray.models.sampling import sample
from rlhf_ray.models.token_math import logprobs_from_logits
from rlhf_ray.ppo.vllm_generator import VllmGeneratorCore, _Row
from tests.conftest import smoke_config

TEMPERATURE = 0.7

# What a hub model's generation_config.json may ship: each one alone would change the sampled
# distribution away from the one PPO's logprobs are computed from.
HUB_DEFAULTS = GenerationConfig(
    do_sample=True,
    temperature=1.3,
    top_k=2,
    top_p=0.5,
    min_p=0.3,
    typical_p=0.4,
    repetition_penalty=5.0,
    no_repeat_ngram_size=1,
    suppress_tokens=[5, 6, 7],
    min_new_tokens=6,
)


@pytest.fixture(scope="module")
def model_with_hub_defaults(tiny_run, tmp_path_factory):
    """The tiny base model saved with HUB_DEFAULTS as its generation_config.json."""
    _, prepared = tiny_run
    path = tmp_path_factory.mktemp("hub-defaults") / "model"
    shutil.copytree(prepared.base_path, path)
    HUB_DEFAULTS.save_pretrained(path)
    return path


class _RecordSamplingProbs:
    """Stands in for torch.multinomial and keeps the probabilities generate() sampled from."""

    def __init__(self, real):
        self.real, self.probs = real, []

    def __call__(self, probs, *args, **kwargs):
        self.probs.append(probs.detach().clone())
        return self.real(probs, *args, **kwargs)


@pytest.mark.parametrize("with_lora", [False, True], ids=["plain", "lora-policy"])
def test_sampled_distribution_is_softmax_of_logits_over_temperature(
    model_with_hub_defaults, tmp_path, monkeypatch, with_lora
):
    cfg = smoke_config(tmp_path)
    model = load_causal_lm(model_with_hub_defaults, cfg.model, cfg.quantization)
    assert model.generation_config.repetition_penalty == 5.0  # the defaults did load
    if with_lora:
        model = add_lora(model, cfg.lora, TaskType.CAUSAL_LM, gradient_checkpointing=False)
    model.eval()
    tok = load_tokenizer(str(model_with_hub_defaults))
    limits = limits_of(cfg.data)
    recorder = _RecordSamplingProbs(torch.multinomial)
    monkeypatch.setattr(torch, "multinomial", recorder)
    torch.manual_seed(0)

    samples, logprobs = sample(
        model, tok, ["a short prompt", "a somewhat longer prompt here"], limits, TEMPERATURE
    )

    monkeypatch.undo()
    sampled = torch.stack(recorder.probs, dim=1)  # (B, steps, V)
    with torch.no_grad():
        logits = response_logits(
            model, samples.query, samples.query_mask, samples.response, samples.response_mask
        )
    expected = torch.softmax(logits.float() / TEMPERATURE, dim=-1)[:, : sampled.shape[1]]
    real = samples.response_mask[:, : sampled.shape[1]].bool()  # steps after EOS are padding
    assert real.any()
    torch.testing.assert_close(sampled[real], expected[real], atol=1e-5, rtol=1e-4)
    # The logprobs sample() returns are those of the sampled tokens under that distribution, as
    # a forward pass over prompt + response computes them (the learner's), and 0 after EOS.
    recomputed = logprobs_from_logits(logits, samples.response, TEMPERATURE)
    torch.testing.assert_close(logprobs, recomputed * samples.response_mask, atol=1e-5, rtol=1e-4)
    assert model.generation_config.repetition_penalty == 5.0  # the model's own is put back


def test_vllm_completions_become_a_batch_masked_up_to_eos_or_their_own_end(tiny_run):
    """How vLLM's outputs become a RolloutBatch (no vLLM needed): a row that ends with EOS is
    masked up to it, one that stopped short without EOS (length-capped) only over its own
    tokens, one that used every token in full; logprobs are 0 on padding."""
    out, _ = tiny_run
    tok = load_tokenizer(str(out / "sft"))
    eos = tok.eos_token_id

    def completion(tokens: list[int], version: int = 3) -> _Row:
        logprobs = [-1.0 - i for i in range(len(tokens))]
        return _Row(list(tokens), logprobs, [version] * len(tokens), done=True)

    generator = SimpleNamespace(tok=tok, version=3, rank=1, chunk_tokens=0)
    rows = [completion([5, 6, eos]), completion([7]), completion([8, 9, 10, 11])]
    batch = VllmGeneratorCore._batch(
        generator, [[1, 2], [3], [4]], rows, ["a", "b", "c"], [0, 1, 2]
    )
    assert batch.response_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert batch.has_eos.tolist() == [True, False, False]
    assert batch.response[1].tolist() == [7] + [tok.pad_token_id] * 3
    assert batch.logprobs.tolist() == [[-1, -2, -3, 0], [-1, 0, 0, 0], [-1, -2, -3, -4]]
    assert batch.query_mask.tolist() == [[1, 1], [0, 1], [0, 1]]  # left-padded prompts
    assert batch.token_versions is None  # whole responses: every token policy_version's
    assert (batch.policy_version, batch.generator_rank) == (3, 1)
    # partial rollouts: a row's later chunk by version 4; the batch's version is its oldest
    generator.chunk_tokens = 2
    rows[2] = _Row([8, 9, 10, 11], [-1.0, -2.0, -3.0, -4.0], [3, 3, 4, 4], done=True)
    batch = VllmGeneratorCore._batch(
        generator, [[1, 2], [3], [4]], rows, ["a", "b", "c"], [0, 1, 2]
    )
    assert batch.token_versions.tolist() == [[3, 3, 3, 0], [3, 0, 0, 0], [3, 3, 4, 4]]
    assert batch.policy_version == 3
