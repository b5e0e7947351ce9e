"""Turning text rows into token ids, the same way in every phase.

A prompt is `[BOS] + template(prompt)`, truncated from the left so the "Assistant:" cue that ends
the template survives. A completion is `" " + completion + [EOS]`, truncated from the right (a
cut completion loses its EOS: teaching the model to stop mid-sentence would be worse).
Prompt and completion are tokenized separately so the prompt ids are exactly those the policy
is given at generation time. Conversational rows (message lists) go through the chat template
instead (`chat`): the same truncation rules apply to the ids it gives.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from rlhf_ray.data import chat
from rlhf_ray.data.chat import Prompt
from rlhf_ray.data.limits import Limits

IGNORE_INDEX = -100  # label value cross-entropy skips


def _raw_prompt_ids(tok: PreTrainedTokenizerBase, prompt: Prompt, limits: Limits) -> list[int]:
    if chat.is_conversational(prompt):
        return chat.chat_prompt_ids(tok, prompt, limits.chat_template)
    ids = tok.encode(limits.template.format(prompt=prompt), add_special_tokens=False)
    return ids if tok.bos_token_id is None else [tok.bos_token_id, *ids]


def _raw_completion_ids(
    tok: PreTrainedTokenizerBase, prompt: Prompt, completion: Prompt, limits: Limits
) -> list[int]:
    if chat.is_conversational(completion):
        return chat.chat_completion_ids(tok, prompt, completion, limits.chat_template)
    return tok.encode(" " + completion.strip(), add_special_tokens=False) + [tok.eos_token_id]


def prompt_ids(tok: PreTrainedTokenizerBase, prompt: Prompt, limits: Limits) -> list[int]:
    return _raw_prompt_ids(tok, prompt, limits)[-limits.max_prompt_tokens :]


def completion_ids(
    tok: PreTrainedTokenizerBase, prompt: Prompt, completion: Prompt, limits: Limits
) -> list[int]:
    """The completion's ids after `prompt` (a message list's depend on its prompt)."""
    return _raw_completion_ids(tok, prompt, completion, limits)[: limits.max_completion_tokens]


def is_overlong(
    tok: PreTrainedTokenizerBase, prompt: Prompt, completions: tuple[Prompt, ...], limits: Limits
) -> bool:
    """Whether the prompt or any completion exceeds its token limit before truncation."""
    if len(_raw_prompt_ids(tok, prompt, limits)) > limits.max_prompt_tokens:
        return True
    return any(
        len(_raw_completion_ids(tok, prompt, c, limits)) > limits.max_completion_tokens
        for c in completions
    )


def sft_example(
    tok: PreTrainedTokenizerBase, prompt: Prompt, completion: Prompt, limits: Limits
) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are IGNORE_INDEX on prompt tokens, so loss is completion-only."""
    p_ids = prompt_ids(tok, prompt, limits)
    c_ids = completion_ids(tok, prompt, completion, limits)
    return p_ids + c_ids, [IGNORE_INDEX] * len(p_ids) + c_ids


def pad_right(seqs: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) int64 right-padded ids and their (B, T) int64 attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) int64 left-padded ids (for generation) and their (B, T) int64 attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask
