"""What the driver sends each PPO role to build itself from (picklable, frozen).

No model code is imported here: the driver builds these and creates the roles but never loads
a model, so it need not import what the roles do (peft, bitsandbytes, transformers' modeling
code; tests/test_layout.py keeps it so).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_ray.config import (
    LoraConfig,
    ModelConfig,
    PPOConfig,
    QuantizationConfig,
    RolloutConfig,
)
from rlhf_ray.config.rollout import vllm_installed
from rlhf_ray.data.limits import Limits
from rlhf_ray.errors import ConfigError
from rlhf_ray.models.loading import FrozenModelSettings


@dataclass(frozen=True)
class PolicySettings:
    """What it takes to build the policy (SFT model + LoRA adapter), in a generator or learner."""

    sft_path: str
    model: ModelConfig
    quantization: QuantizationConfig
    lora: LoraConfig
    limits: Limits
    temperature: float
    cpus: float  # the CPUs this process may use: its torch threads
    gpus: float
    seed: int


@dataclass(frozen=True)
class LearnerSettings:
    policy: PolicySettings
    # the critic starts from the trained reward model, or from the SFT model with a new value
    # head when the run uses no reward model; unused when the estimator has no critic
    critic_path: str
    critic_method: str  # "full" or "lora", as the reward model is trained
    ppo: PPOConfig
    # "sampler" or "learner" (Config.logprob_source): learner = old logprobs from the learner's
    # own pass, the sampler being another computation (vLLM, or generate's decode in bf16/4-bit)
    logprob_source: str = "sampler"
    rollout: RolloutConfig = RolloutConfig()  # logprob_correction and tis_cap
    # resources.learner_sharding: "fsdp" shards a full-parameter critic over the learner ranks
    critic_sharding: str = "ddp"

    @property
    def recomputes_logprobs(self) -> bool:
        return self.logprob_source == "learner"


@dataclass(frozen=True)
class ScorerSettings:
    reward_model: FrozenModelSettings | None  # None when scoring.reward_model_weight is 0
    reward_model_weight: float
    functions: tuple[str, ...]  # module:function
    function_weights: tuple[float, ...]  # one per function
    tokenizer_path: str  # the SFT model's directory: decodes completions for the functions
    trust_remote_code: bool
    watch_gold: bool = False  # also score with the gold judge, at weight 0 (synthetic prompts)


@dataclass(frozen=True)
class EngineSettings:
    """The vLLM engine's share of a generator: its settings and where it runs."""

    rollout: RolloutConfig
    max_model_len: int  # prompt + completion tokens of the longest rollout
    # rollout.engine auto: the generator takes vLLM only where it can run it (installed on its
    # node, and a GPU), else Hugging Face generate; with vllm it must
    auto: bool = False

    def runs_here(self) -> str | None:
        """Why vLLM cannot run in this process (None: it can). Under auto a generator then
        samples with hf; with rollout.engine vllm it fails to start, saying so."""
        import torch

        if not vllm_installed():
            return "vLLM is not installed on this node"
        if self.auto and not torch.cuda.is_available():
            return "no CUDA GPU is visible to this generator"
        return None


def engine_quantization(rollout: RolloutConfig, base_in_4bit: bool) -> str | None:
    """What `rollout.vllm_quantization` means with the vLLM installed here (the driver's
    check, before any work): a name vLLM knows, or None (the base in its dtype)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    choice = rollout.vllm_quantization
    if choice == "auto":
        return "bitsandbytes" if base_in_4bit and "bitsandbytes" in QUANTIZATION_METHODS else None
    if choice == "none":
        return None
    if choice not in QUANTIZATION_METHODS:
        raise ConfigError(
            f"rollout.vllm_quantization={choice!r}: this vLLM has no such quantization; "
            f"expected auto, none or one of {', '.join(QUANTIZATION_METHODS)}"
        )
    return choice
