"""The rollout generator's work on vLLM, Ray-free: the SFT model in a vLLM engine, the policy's
LoRA adapter served as a versioned `LoRARequest`.

Adapter-only sync: the learner's LoRA tensors (the same `Weights` the Hugging Face engine loads)
are written as a PEFT adapter directory and served under a new LoRA id per policy version; the
previous version's adapter is removed from the engine and its directory deleted. The base model
stays loaded as it is (4-bit through vLLM's bitsandbytes loading in the QLoRA preset), never
merged or re-quantised. Every batch carries the version of the adapter that sampled it.
(vLLM 0.32 dropped bitsandbytes: there the QLoRA base is served in its compute dtype, or in a
quantization vLLM has, `rollout.vllm_quantization`; the learner's 4-bit base then differs a
little from the sampler's, which rollout/logprob_gap_* shows and tis corrects.)

Sampling is plain ancestral sampling at the temperature (no top-k/top-p, no repetition
penalty, the model's generation_config.json ignored), and the logprobs vLLM returns are those of
softmax(logits / temperature) (`logprobs_mode="processed_logprobs"`), what PPO assumes. The
learner still recomputes them with its own forward pass (rollout/logprob_gap_* says how far
apart they are), since two implementations of one model never agree to the last bit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from transformers import AutoConfig

from rlhf_ray.data.chat import Prompt
from rlhf_ray.data.encoding import pad_left, prompt_ids
from rlhf_ray.data.tokenizer import load_tokenizer
from rlhf_ray.models.adapters import write_adapter
from rlhf_ray.models.loading import use_cpus
from rlhf_ray.models.token_math import truncate_after_eos
from rlhf_ray.ppo.messages import RolloutBatch, Weights
from rlhf_ray.ppo.settings import EngineSettings, PolicySettings, engine_quantization

# LoRA ranks vLLM can be configured for (vllm.config.lora.MaxLoRARanks)
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _set_engine_environment(settings: EngineSettings, cpus: float) -> None:
    """Environment vLLM reads when the engine starts. Inside a Ray actor the engine runs in this
    process (vLLM's engine subprocess needs a script's `__main__` guard), and on CPUs it uses
    this role's threads without pinning them to cores other roles use."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.rollout.cpu_kv_cache_gib)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(cpus))))


def _engine_dtype(settings: PolicySettings) -> str:
    quant = settings.quantization
    return quant.compute_dtype if quant.load_in_4bit else settings.model.dtype


def _model_len(policy: PolicySettings, rollout_len: int) -> int:
    """Tokens per sequence the engine plans for: a whole rollout's, which the model's positions
    must hold (a shorter engine would cut rollouts short, or refuse a long prompt mid-run)."""
    config = AutoConfig.from_pretrained(
        policy.sft_path, trust_remote_code=policy.model.trust_remote_code
    )
    positions = getattr(config, "max_position_embeddings", None)
    if positions and positions < rollout_len:
        raise ValueError(
            f"{policy.sft_path}: the model has {positions} positions, fewer than a rollout's "
            f"{rollout_len} (data.max_prompt_tokens + data.max_completion_tokens)"
        )
    return rollout_len


def build_engine(policy: PolicySettings, engine: EngineSettings, seed: int):
    """A vLLM engine on the SFT model that serves one LoRA adapter at a time. In this process
    vLLM seeds the global RNGs with `seed`."""
    _set_engine_environment(engine, policy.cpus)
    use_cpus(policy.cpus)
    from vllm import LLM  # imported here: vLLM is an optional install

    rollout = engine.rollout
    on_gpu = policy.gpus > 0 and torch.cuda.is_available()
    options = {
        "model": policy.sft_path,
        "skip_tokenizer_init": True,  # prompts arrive as token ids
        "trust_remote_code": policy.model.trust_remote_code,
        "dtype": _engine_dtype(policy),
        "seed": seed,
        "max_model_len": rollout.max_model_len or _model_len(policy, engine.max_model_len),
        "enable_lora": True,
        "max_loras": 1,
        "max_lora_rank": min(r for r in _VLLM_LORA_RANKS if r >= policy.lora.r),
        "logprobs_mode": "processed_logprobs",  # of softmax(logits / temperature)
        "generation_config": "vllm",  # not the model's sampling defaults
        "enforce_eager": rollout.enforce_eager or not on_gpu,
    }
    # resolved here, against the vLLM of this node (with auto the driver may have none)
    quantization = engine_quantization(rollout, policy.quantization.load_in_4bit)
    if quantization is not None:
        options["quantization"] = quantization
    if on_gpu:
        options["gpu_memory_utilization"] = rollout.gpu_memory_utilization
    return LLM(**options)


class VllmGeneratorCore:
    """The same interface as `rollout_generator.RolloutGenerator`, sampling with vLLM."""

    def __init__(self, settings: PolicySettings, engine: EngineSettings, rank: int) -> None:
        self.settings, self.rank = settings, rank
        self.tok = load_tokenizer(settings.sft_path, settings.model.trust_remote_code)
        # the learner uses the base seed itself; torch's RNG draws each request's sampling seed
        self.llm = build_engine(settings, engine, seed=settings.seed + rank + 1)
        torch.manual_seed(settings.seed + rank + 1)
        self.adapters = _adapter_dir()
        self.version = -1  # no learner weights loaded yet
        self.lora = None  # the LoRARequest of `version`
        self.chunk_tokens = engine.rollout.partial_chunk_tokens  # 0: whole responses

    def load_weights(self, weights: Weights) -> None:
        """Serve the learner's adapter of `weights.version`; the previous one is dropped. The
        version served already (a restarted generator asked the learner, then Ray retried the
        load it died in) is kept as it is."""
        from vllm.lora.request import LoRARequest

        if weights.version == self.version:
            return
        path = self.adapters / f"v{weights.version}"
        write_adapter(weights.tensors, self.settings.lora, self.settings.sft_path, path)
        # ids start at 1 and are unique per version, so vLLM never serves a cached older one
        lora = LoRARequest(f"policy-v{weights.version}", weights.version + 1, str(path))
        if not self.llm.llm_engine.add_lora(lora):
            raise RuntimeError(f"vLLM did not load the adapter of policy version {weights.version}")
        if self.lora is not None and self.lora.lora_int_id != lora.lora_int_id:
            self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
            shutil.rmtree(self.lora.lora_path, ignore_errors=True)
        self.lora, self.version = lora, weights.version

    @torch.no_grad()
    def generate(
        self,
        prompts: list[Prompt],
        group: list[int],
        newer: Callable[[int], Weights | None] | None = None,
    ) -> RolloutBatch:
        """One response per entry of `prompts`, tagged with its prompt group from `group`.
        With rollout.partial_chunk_tokens the responses are sampled that many tokens at a time,
        and before each chunk `newer(version)` may hand over weights newer than the ones served:
        the rows still being sampled go on under them (their prompt and tokens so far prefilled
        again by the new adapter), each token's version recorded."""
        if self.version < 0:
            raise RuntimeError(f"rollout generator {self.rank} has no policy weights yet")
        from vllm import TokensPrompt

        limits = self.settings.limits
        ids = [prompt_ids(self.tok, p, limits) for p in prompts]
        rows = [_Row() for _ in ids]
        chunk = self.chunk_tokens or limits.max_completion_tokens
        while sampling := [i for i, row in enumerate(rows) if not row.done]:
            weights = newer(self.version) if newer is not None else None
            if weights is not None:
                self.load_weights(weights)
            # one seed per request, drawn from torch's RNG: the RNG a checkpoint saves
            seeds = torch.randint(0, 2**31 - 1, (len(sampling),)).tolist()
            left = [limits.max_completion_tokens - len(rows[i].tokens) for i in sampling]
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=ids[i] + rows[i].tokens) for i in sampling],
                [self._params(seed, min(chunk, n)) for seed, n in zip(seeds, left, strict=True)],
                lora_request=self.lora,
                use_tqdm=False,
            )
            for i, output, n in zip(sampling, outputs, left, strict=True):
                rows[i].extend(output.outputs[0], self.version, n)
        return self._batch(ids, rows, prompts, group)

    def _params(self, seed: int, max_tokens: int):
        from vllm import SamplingParams

        return SamplingParams(
            temperature=self.settings.temperature,
            top_p=1.0,
            top_k=0,
            max_tokens=max_tokens,
            stop_token_ids=[self.tok.eos_token_id],
            logprobs=0,  # the sampled token's own logprob
            detokenize=False,
            seed=seed,
        )

    def _batch(self, ids: list[list[int]], rows: list[_Row], prompts, group) -> RolloutBatch:
        tok = self.tok
        query, query_mask = pad_left(ids, tok.pad_token_id)
        lengths = torch.tensor([len(row.tokens) for row in rows])  # (B,)
        width = max(1, int(lengths.max()))
        generated = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.int64)
        logprobs = torch.zeros((len(ids), width), dtype=torch.float32)
        versions = torch.zeros((len(ids), width), dtype=torch.int64)
        for i, row in enumerate(rows):
            generated[i, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.int64)
            logprobs[i, : len(row.tokens)] = torch.tensor(row.logprobs)
            versions[i, : len(row.tokens)] = torch.tensor(row.versions, dtype=torch.int64)
        response, mask, has_eos = truncate_after_eos(generated, tok.eos_token_id, tok.pad_token_id)
        # a row that stopped without EOS before `width` (length-capped) is padded: not response
        mask = mask * (torch.arange(width) < lengths[:, None])
        real = mask > 0
        oldest = int(versions[real].min()) if real.any() else self.version
        return RolloutBatch(
            query=query,
            query_mask=query_mask,
            response=response,
            response_mask=mask,
            has_eos=has_eos,
            logprobs=logprobs * mask,
            group=torch.tensor(group, dtype=torch.int64),
            prompts=list(prompts),
            policy_version=oldest,
            generator_rank=self.rank,
            engine="vllm",
            token_versions=versions * real if self.chunk_tokens else None,
        )

    def close(self) -> None:
        shutil.rmtree(self.adapters, ignore_errors=True)


@dataclass
class _Row:
    """A response being sampled, chunk by chunk: its tokens, their logprobs and versions."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    done: bool = False

    def extend(self, completion, version: int, left: int) -> None:
        """Append a chunk vLLM sampled (`left`: tokens this row had left before it); done at
        EOS (vLLM stops there) or at the completion limit."""
        tokens = list(completion.token_ids)
        self.tokens += tokens
        self.logprobs += [
            step[token].logprob for step, token in zip(completion.logprobs, tokens, strict=True)
        ]
        self.versions += [version] * len(tokens)
        self.done = completion.finish_reason != "length" or len(tokens) >= left


def _adapter_dir() -> Path:
    """This process's directory of served adapters, `<tmp>/rlhf-ray-adapters/<pid>`. Those of
    processes no longer alive (generators killed or stopped, which never get to clean up) are
    deleted first."""
    root = Path(tempfile.gettempdir()) / "rlhf-ray-adapters"
    root.mkdir(exist_ok=True)
    for old in root.iterdir():
        if old.name.isdigit() and not psutil.pid_exists(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    mine = root / str(os.getpid())
    shutil.rmtree(mine, ignore_errors=True)  # a pid reused since
    mine.mkdir()
    return mine
