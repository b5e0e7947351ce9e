"""The rollout generator's work, Ray-free: a copy of the policy that samples responses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import TaskType

from rlhf_ray.config import LoraConfig, ModelConfig, QuantizationConfig
from rlhf_ray.encoding import Limits
from rlhf_ray.forward import response_logprobs
from rlhf_ray.messages import RolloutBatch, Weights
from rlhf_ray.models import (
    add_lora,
    disable_dropout,
    load_causal_lm,
    load_trainable_state,
    to_device,
    use_cpus,
)
from rlhf_ray.sampling import sample
from rlhf_ray.tokenizer import load_tokenizer


@dataclass(frozen=True)
class PolicyJob:
    """What it takes to build the policy (SFT model + LoRA adapter), in a generator or learner."""

    sft_path: str
    model: ModelConfig
    quantization: QuantizationConfig
    lora: LoraConfig
    limits: Limits
    temperature: float
    cpus: float
    gpus: float
    seed: int


def build_policy(job: PolicyJob):
    """(tokenizer, policy): the SFT model with a fresh LoRA adapter, every dropout off."""
    use_cpus(job.cpus)
    tok = load_tokenizer(job.sft_path, job.model.trust_remote_code)
    base = load_causal_lm(job.sft_path, job.model, job.quantization)
    policy = add_lora(base, job.lora, TaskType.CAUSAL_LM, job.model.gradient_checkpointing)
    disable_dropout(policy)
    return tok, to_device(policy, job.gpus)


class RolloutWorker:
    def __init__(self, job: PolicyJob, rank: int) -> None:
        self.job, self.rank = job, rank
        torch.manual_seed(job.seed + rank + 1)  # the learner uses the base seed itself
        self.tok, policy = build_policy(job)
        self.policy = policy.eval()
        self.version = -1  # no learner weights loaded yet

    def load_weights(self, weights: Weights) -> None:
        load_trainable_state(self.policy, weights.tensors)
        self.version = weights.version

    @torch.no_grad()
    def generate(self, prompts: list[str]) -> RolloutBatch:
        if self.version < 0:
            raise RuntimeError(f"rollout generator {self.rank} has no policy weights yet")
        s = sample(self.policy, self.tok, prompts, self.job.limits, self.job.temperature)
        logprobs = response_logprobs(
            self.policy, s.query, s.query_mask, s.response, s.response_mask, self.job.temperature
        )
        return RolloutBatch(
            **{name: tensor.cpu() for name, tensor in vars(s).items()},
            logprobs=(logprobs * s.response_mask).cpu(),
            policy_version=self.version,
            generator_rank=self.rank,
        )
