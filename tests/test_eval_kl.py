"""The evaluation phase's KL of the policy to the reference: per response, over every held-out
sample, and what summary.json makes of it."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_ray.data.prepare import limits_of, read_rows
from rlhf_ray.data.tokenizer import load_tokenizer
from rlhf_ray.models.forward import response_logprobs
from rlhf_ray.models.loading import FrozenModelSettings, load_frozen_causal_lm
from rlhf_ray.models.sampling import decode_responses, sample
from rlhf_ray.run.evaluation import EvalSettings, generate_eval_responses
from rlhf_ray.run.report import _heldout_kl
from tests.conftest import smoke_config

SAMPLES, PROMPTS = 2, 4


def _moved_copy(model_dir: Path, out_dir: Path) -> Path:
    """`model_dir` with seeded noise (std 0.05) added to every weight: a policy that has moved
    away from its reference."""
    shutil.copytree(model_dir, out_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(0.05 * torch.randn(weight.shape, generator=generator))
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def eval_setup(tiny_run, tmp_path_factory):
    out, prepared = tiny_run
    cfg = smoke_config(out)
    policy_dir = _moved_copy(out / "sft", tmp_path_factory.mktemp("eval-kl") / "policy")
    frozen = dict(model=cfg.model, quantization=cfg.quantization, cpus=1, gpus=0)
    policy = FrozenModelSettings(str(policy_dir), **frozen)
    reference = FrozenModelSettings(str(out / "sft"), **frozen)
    # one batch of every sample, so that a single `sample` call below draws the same ones
    eval_cfg = replace(cfg.eval, samples_per_prompt=SAMPLES, batch_size=SAMPLES * PROMPTS)
    settings = EvalSettings(policy, eval_cfg, limits_of(cfg.data), 0, reference)
    prompts = [row["prompt"] for row in read_rows(prepared.data_dir, "eval_prompts")][:PROMPTS]
    return settings, prompts


def test_kl_is_the_policy_logprobs_minus_the_reference_summed_per_response(eval_setup):
    settings, prompts = eval_setup
    result = generate_eval_responses(settings, prompts)

    # the same samples drawn again, and both models' logprobs of them by a full forward pass
    policy = load_frozen_causal_lm(settings.model)
    reference = load_frozen_causal_lm(settings.reference)
    tok = load_tokenizer(settings.model.path)
    torch.manual_seed(settings.seed)
    flat = [p for p in prompts for _ in range(SAMPLES)]
    samples, _ = sample(policy, tok, flat, settings.limits, settings.eval.temperature)
    assert [t for row in result.texts for t in row] == decode_responses(tok, samples)
    tensors = (samples.query, samples.query_mask, samples.response, samples.response_mask)
    with torch.no_grad():
        gap = response_logprobs(policy, *tensors, 1.0) - response_logprobs(reference, *tensors, 1.0)
    expected = (gap * samples.response_mask).sum(1)

    measured = torch.tensor([kl for row in result.kl for kl in row])
    assert len(result.kl) == PROMPTS and all(len(row) == SAMPLES for row in result.kl)
    assert measured.abs().max() > 0.5  # the policy did move
    torch.testing.assert_close(measured, expected, atol=1e-4, rtol=1e-4)


def test_the_reference_changes_no_sample_and_is_zero_kl_to_itself(eval_setup):
    settings, prompts = eval_setup
    with_reference = generate_eval_responses(settings, prompts)
    alone = generate_eval_responses(replace(settings, reference=None), prompts)
    assert alone.texts == with_reference.texts and alone.kl is None
    itself = generate_eval_responses(replace(settings, reference=settings.model), prompts)
    assert max(abs(kl) for row in itself.kl for kl in row) < 1e-4


def test_summary_kl_is_the_mean_and_largest_over_every_sample():
    assert _heldout_kl([[1.0, 3.0], [0.5, 7.5]]) == {"kl_heldout": 3.0, "kl_heldout_max": 7.5}
    assert _heldout_kl([]) == {"kl_heldout": None}  # no held-out prompts
