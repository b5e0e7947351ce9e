"""The rollout generator's work, Ray-free: a copy of the policy that samples responses."""

from __future__ import annotations

import torch
from peft import TaskType

from rlhf_ray.data.chat import Prompt
from rlhf_ray.data.tokenizer import load_tokenizer
from rlhf_ray.models.adapters import add_lora
from rlhf_ray.models.loading import (
    disable_dropout,
    load_causal_lm,
    load_trainable_state,
    to_device,
    use_cpus,
)
from rlhf_ray.models.sampling import sample
from rlhf_ray.ppo.messages import RolloutBatch, Weights
from rlhf_ray.ppo.settings import PolicySettings


def build_policy(settings: PolicySettings):
    """(tokenizer, policy): the SFT model with a fresh LoRA adapter, every dropout off."""
    use_cpus(settings.cpus)
    tok = load_tokenizer(settings.sft_path, settings.model.trust_remote_code)
    base = load_causal_lm(settings.sft_path, settings.model, settings.quantization)
    policy = add_lora(
        base, settings.lora, TaskType.CAUSAL_LM, settings.model.gradient_checkpointing
    )
    disable_dropout(policy)
    return tok, to_device(policy, settings.gpus)


class HFGeneratorCore:
    def __init__(self, settings: PolicySettings, rank: int) -> None:
        self.settings, self.rank = settings, rank
        torch.manual_seed(settings.seed + rank + 1)  # the learner uses the base seed itself
        self.tok, policy = build_policy(settings)
        self.policy = policy.eval()
        self.version = -1  # no learner weights loaded yet

    def load_weights(self, weights: Weights) -> None:
        load_trainable_state(self.policy, weights.tensors)
        self.version = weights.version

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], group: list[int]) -> RolloutBatch:
        """One response per entry of `prompts` (a prompt appears once per sample), each row
        tagged with its prompt group id from `group`."""
        if self.version < 0:
            raise RuntimeError(f"rollout generator {self.rank} has no policy weights yet")
        samples, logprobs = sample(
            self.policy, self.tok, prompts, self.settings.limits, self.settings.temperature
        )
        return RolloutBatch(
            **{name: tensor.cpu() for name, tensor in vars(samples).items()},
            logprobs=logprobs.cpu(),
            group=torch.tensor(group, dtype=torch.int64),
            prompts=list(prompts),
            policy_version=self.version,
            generator_rank=self.rank,
        )
