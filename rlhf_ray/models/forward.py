"""How each model is run on token batches, shared by training, scoring and PPO.

Position ids always come from the attention mask, so left padding (generation) and right
padding (training) give every real token the same position (DESIGN section 4).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rlhf_ray.models.loading import without_adapter
from rlhf_ray.models.token_math import last_token_index, logprobs_from_logits

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B, T) int64 positions counting real tokens only; 0 on leading padding."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def token_scalars(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The scalar head applied at every position: (B, T) ids/mask -> (B, T) float32.

    For a reward model this is the score of every prefix; for a critic, the value of every state.
    """
    inner = without_adapter(model)
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    return inner.score(hidden.last_hidden_state).squeeze(-1).float()


def sequence_scores(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reward-model score read at the last real token of each row: (B, T) -> (B,) float32."""
    scalars = token_scalars(model, ids, mask)
    rows = torch.arange(scalars.shape[0], device=scalars.device)
    # indexing makes a new tensor, where gather + squeeze made a view: FSDP2 warns of a view
    # that a module it wraps returns (SequenceScores)
    return scalars[rows, last_token_index(mask)]


def causal_logits(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T, V) next-token logits."""
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits


def prompt_response(
    query: torch.Tensor,  # (B, P) int64 prompt ids, left-padded
    query_mask: torch.Tensor,  # (B, P)
    response: torch.Tensor,  # (B, R) int64 response ids, right-padded
    response_mask: torch.Tensor,  # (B, R), any dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences every model reads: ids (B, P+R) and mask (B, P+R) in query_mask's dtype."""
    ids = torch.cat([query, response], dim=1)
    mask = torch.cat([query_mask, response_mask.to(query_mask.dtype)], dim=1)
    return ids, mask


def response_logits(
    model: PreTrainedModel,
    query: torch.Tensor,  # (B, P) int64 prompt ids, left-padded
    query_mask: torch.Tensor,  # (B, P)
    response: torch.Tensor,  # (B, R) int64 response ids, right-padded
    response_mask: torch.Tensor,  # (B, R)
) -> torch.Tensor:
    """(B, R, V) logits that predicted each response token (positions P-1 .. P+R-2)."""
    ids, mask = prompt_response(query, query_mask, response, response_mask)
    return causal_logits(model, ids, mask)[:, query.shape[1] - 1 : -1]


def response_logprobs(model, query, query_mask, response, response_mask, temperature: float):
    """(B, R) log-probabilities of the response tokens under `model` at `temperature`."""
    logits = response_logits(model, query, query_mask, response, response_mask)
    return logprobs_from_logits(logits, response, temperature)


def response_values(critic, query, query_mask, response, response_mask) -> torch.Tensor:
    """(B, R) critic values of the state before each response token."""
    ids, mask = prompt_response(query, query_mask, response, response_mask)
    return token_scalars(critic, ids, mask)[:, query.shape[1] - 1 : -1]


class ResponseLogits(torch.nn.Module):
    """`response_logits` of `model` as a module's forward: what the learner trains through,
    so that DDP, wrapping it, readies the gradient reduction in the forward it sees."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, query, query_mask, response, response_mask) -> torch.Tensor:
        return response_logits(self.model, query, query_mask, response, response_mask)


class ResponseValues(torch.nn.Module):
    """`response_values` of a critic as a module's forward (see ResponseLogits)."""

    def __init__(self, critic: PreTrainedModel) -> None:
        super().__init__()
        self.critic = critic

    def forward(self, query, query_mask, response, response_mask) -> torch.Tensor:
        return response_values(self.critic, query, query_mask, response, response_mask)


class SequenceScores(torch.nn.Module):
    """`sequence_scores` of a reward model as a module's forward: what its training runs
    through, wrapped by DDP or FSDP2 (see ResponseLogits). (B, T) ids, mask -> (B,) float32."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return sequence_scores(self.model, ids, mask)
