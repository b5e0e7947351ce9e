"""The reward scorer's and the reference model's work, Ray-free."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_ray.config import ModelConfig, QuantizationConfig
from rlhf_ray.forward import response_logprobs, sequence_scores
from rlhf_ray.messages import RolloutBatch
from rlhf_ray.models import load_causal_lm, load_scalar_model, to_device, use_cpus
from rlhf_ray.tokenizer import load_tokenizer


@dataclass(frozen=True)
class FrozenModelJob:
    path: str  # the reward model directory, or the SFT model directory for the reference
    model: ModelConfig
    quantization: QuantizationConfig
    cpus: float
    gpus: float


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class Scorer:
    """The trained reward model, reading its score at the last real token of prompt+response."""

    def __init__(self, job: FrozenModelJob) -> None:
        use_cpus(job.cpus)
        tok = load_tokenizer(job.path, job.model.trust_remote_code)
        model = load_scalar_model(job.path, job.model, job.quantization, tok.pad_token_id)
        self.model = to_device(model, job.gpus).eval()

    @torch.no_grad()
    def score(self, batch: RolloutBatch) -> torch.Tensor:
        """-> (B,) float32 reward-model scores."""
        dev = _device(self.model)
        ids = torch.cat([batch.query, batch.response], dim=1).to(dev)
        mask = torch.cat([batch.query_mask, batch.response_mask.long()], dim=1).to(dev)
        return sequence_scores(self.model, ids, mask).cpu()


class Reference:
    """The frozen SFT policy: logprobs of the sampled responses, for the KL penalty."""

    def __init__(self, job: FrozenModelJob, temperature: float) -> None:
        use_cpus(job.cpus)
        model = load_causal_lm(job.path, job.model, job.quantization)
        self.model = to_device(model, job.gpus).eval()
        self.temperature = temperature

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """-> (B, R) float32 reference logprobs at the sampling temperature, 0 on padding."""
        dev = _device(self.model)
        lp = response_logprobs(
            self.model,
            batch.query.to(dev),
            batch.query_mask.to(dev),
            batch.response.to(dev),
            batch.response_mask.to(dev),
            self.temperature,
        )
        return (lp.cpu() * batch.response_mask).float()
