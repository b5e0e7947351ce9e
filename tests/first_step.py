"""PPO's first step on the smoke model in a GPU dtype, Ray-free: what tests/test_gpu_path.py
checks and bench/logprob_gaps.py measures. Policy and reference are the same weights, so the KL
is 0 and the ratio 1 where both compute alike; the sampler's logprobs differ by its engine's and
dtype's gap.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from jobs.ppo.roles import policy_settings
from rlhf_ray.config.rollout import RolloutConfig
from rlhf_ray.data.prepare import read_rows
from rlhf_ray.models.loading import FrozenModelSettings
from rlhf_ray.ppo.learner import LearnerCore
from rlhf_ray.ppo.messages import Scores
from rlhf_ray.ppo.reference_model import ReferenceCore
from rlhf_ray.ppo.settings import EngineSettings, LearnerSettings
from tests.conftest import make_tiny_run, smoke_config

# The smoke model at hidden size 64 (4-bit blocks need it) with heads of 32 (vLLM's CPU
# attention has no 16), LoRA SFT and reward model as in the 7B preset
SHAPE = {"model.hidden_size": "64", "model.intermediate_size": "128", "model.num_heads": "2"}
SHAPE |= {"sft.method": "lora", "reward.method": "lora"}
DTYPES = {
    "float32": {},
    "bfloat16": {"model.dtype": "bfloat16"},
    "4-bit": {"quantization.load_in_4bit": "true"},  # nf4, double quantisation, bf16 compute
}


def first_step(out: Path, dtype: str, rollouts: int, engine: str = "hf"):
    """(config, tokens sampled, {logprob source: the learner's statistics of step 1}) for a
    tiny run made in `out`; a vLLM batch is always recomputed, so vllm has the learner's only."""
    overrides = {**SHAPE, **DTYPES[dtype]}
    out, prepared = make_tiny_run(out, **overrides)
    cfg = smoke_config(out, **overrides)
    policy = replace(policy_settings(cfg, out), cpus=2)
    ppo = replace(cfg.ppo, rollouts_per_step=rollouts, minibatch_size=rollouts, epochs=1)
    settings = LearnerSettings(policy, str(out / "reward"), cfg.reward.method, ppo)
    sampler = _generator(
        engine, policy, cfg.data.max_prompt_tokens + cfg.data.max_completion_tokens
    )
    sampler.load_weights(LearnerCore(settings).weights())
    prompts = [row["prompt"] for row in read_rows(prepared.data_dir, "prompts")]
    batch = sampler.generate((prompts * rollouts)[:rollouts], list(range(rollouts)))
    frozen = FrozenModelSettings(str(out / "sft"), cfg.model, cfg.quantization, 1, 0)
    ref = ReferenceCore(frozen, policy.temperature).logprobs(batch)
    scores = Scores(torch.zeros(rollouts), {}, [batch.key])
    stats = {}
    for source in ("learner", "sampler") if engine == "hf" else ("learner",):
        learner = LearnerCore(replace(settings, logprob_source=source))
        stats[source] = learner.train([replace(batch)], scores, [ref])
    return cfg, int(batch.response_mask.sum()), stats


def _generator(engine: str, policy, rollout_len: int):
    if engine == "hf":
        from rlhf_ray.ppo.rollout_generator import HFGeneratorCore

        return HFGeneratorCore(policy, rank=0)
    from rlhf_ray.ppo.vllm_generator import VllmGeneratorCore  # vLLM: an optional install

    return VllmGeneratorCore(policy, EngineSettings(RolloutConfig(), rollout_len), rank=0)
