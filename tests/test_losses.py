"""Tests for the SFT and reward losses, token encoding, padding and where scores are read.

Expected values are worked out by hand: logits [ln 3, 0] give softmax [3/4, 1/4], so the
cross-entropy of token 0 is -ln(3/4) = ln(4/3) and of token 1 is -ln(1/4) = ln 4.
"""

import math

import pytest
import torch
from transformers import MistralConfig, MistralForSequenceClassification

from rlhf_ray.data.encoding import IGNORE_INDEX, Limits, pad_left, pad_right, sft_example
from rlhf_ray.data.tokenizer import train_bpe_tokenizer
from rlhf_ray.models.forward import position_ids, sequence_scores
from rlhf_ray.train.reward import bradley_terry_loss, pair_stats
from rlhf_ray.train.sft import collate, completion_only_loss

LN3, LN2 = math.log(3.0), math.log(2.0)
TEMPLATE = "User: {prompt}\nAssistant:"


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, t(b) if not isinstance(b, torch.Tensor) else b, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def tok():
    texts = [
        TEMPLATE.format(prompt=p) + " " + c
        for p, c in [
            ("What is the capital of France?", "The capital of France is Paris."),
            ("Give me a tip for sleeping better.", "Go to bed at the same time every night."),
            ("How do I make a poison?", "I'm sorry, but I can't help with that."),
        ]
    ]
    return train_bpe_tokenizer(texts * 5, vocab_size=300)


# --- SFT: completion-only cross-entropy ----------------------------------------------------------


def test_completion_only_loss_shifts_and_skips_prompt_tokens():
    # V = 2, T = 3. Position t predicts label t+1; the last position predicts nothing.
    logits = t([[[LN3, 0.0], [0.0, 0.0], [100.0, -100.0]]])
    # Labels: prompt token ignored, then tokens 0 and 1.
    labels = t([[IGNORE_INDEX, 0, 1]], torch.long)
    # pos 0 -> label 0 under [3/4, 1/4]: ln(4/3); pos 1 -> label 1 under [1/2, 1/2]: ln 2.
    close(completion_only_loss(logits, labels), (math.log(4 / 3) + LN2) / 2)
    # Ignoring one more label leaves only pos 1: ln 2.
    labels = t([[IGNORE_INDEX, IGNORE_INDEX, 1]], torch.long)
    close(completion_only_loss(logits, labels), LN2)


def test_completion_only_loss_is_a_mean_over_tokens_not_rows():
    logits = t(
        [
            [[LN3, 0.0], [0.0, 0.0], [0.0, 0.0]],
            [[0.0, LN3], [55.0, 0.0], [0.0, 0.0]],  # pos 1 of row 1 predicts padding: skipped
        ]
    )
    labels = t([[IGNORE_INDEX, 0, 1], [IGNORE_INDEX, 1, IGNORE_INDEX]], torch.long)
    # Row 0: ln(4/3) + ln 2 (two tokens); row 1: label 1 under [1/4, 3/4] -> ln(4/3) (one token).
    # Token mean: (2 ln(4/3) + ln 2) / 3, not the row mean ((ln(4/3) + ln 2)/2 + ln(4/3)) / 2.
    close(completion_only_loss(logits, labels), (2 * math.log(4 / 3) + LN2) / 3)


def test_completion_only_loss_gradient_reaches_only_predicting_positions():
    logits = t([[[LN3, 0.0], [0.0, 0.0], [0.0, 0.0]]]).requires_grad_()
    completion_only_loss(logits, t([[IGNORE_INDEX, 0, IGNORE_INDEX]], torch.long)).backward()
    # d CE / d logits = softmax - onehot = [3/4 - 1, 1/4] at pos 0; zero elsewhere.
    close(logits.grad, [[[-0.25, 0.25], [0.0, 0.0], [0.0, 0.0]]])


def test_collate_right_pads_ids_mask_and_labels():
    examples = [([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([5, 8], [IGNORE_INDEX, 8])]
    ids, mask, labels = collate(examples, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [5, 8, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert labels.tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 8, IGNORE_INDEX]]
    assert ids.dtype == labels.dtype == torch.int64


# --- encoding ------------------------------------------------------------------------------------


def test_tiny_tokenizer_has_distinct_special_tokens(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_sft_example_masks_prompt_tokens(tok):
    limits = Limits(TEMPLATE, max_prompt_tokens=64, max_completion_tokens=64)
    ids, labels = sft_example(
        tok, "What is the capital of France?", "The capital is Paris.", limits
    )
    assert len(ids) == len(labels)
    n_prompt = sum(1 for label in labels if label == IGNORE_INDEX)
    # The prompt is [BOS] + the templated text; the completion " The capital is Paris." + [EOS].
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:n_prompt]) == "User: What is the capital of France?\nAssistant:"
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]  # every completion token is a target
    assert tok.decode(ids[n_prompt:-1]) == " The capital is Paris."
    assert ids[-1] == labels[-1] == tok.eos_token_id


def test_sft_example_truncates_prompt_left_and_completion_right(tok):
    full = Limits(TEMPLATE, 64, 64)
    ids, labels = sft_example(tok, "How do I make a poison?", "I can't help with that.", full)
    n_prompt = labels.count(IGNORE_INDEX)
    n_completion = len(ids) - n_prompt
    assert n_prompt > 4 and n_completion > 3

    short = Limits(TEMPLATE, max_prompt_tokens=4, max_completion_tokens=3)
    s_ids, s_labels = sft_example(tok, "How do I make a poison?", "I can't help with that.", short)
    # Prompt: its last 4 tokens (the "Assistant:" cue survives, BOS is cut);
    # completion: its first 3 tokens (EOS is cut).
    assert s_ids[:4] == ids[n_prompt - 4 : n_prompt]
    assert tok.decode(s_ids[:4]).endswith("Assistant:")
    assert s_ids[4:] == ids[n_prompt : n_prompt + 3]
    assert s_labels == [IGNORE_INDEX] * 4 + ids[n_prompt : n_prompt + 3]
    assert tok.eos_token_id not in s_ids


def test_pad_right_and_pad_left():
    ids, mask = pad_right([[1, 2, 3], [4]], pad_value=9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_left([[1, 2, 3], [4]], pad_value=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.int64


def test_position_ids_count_real_tokens_only():
    mask = t([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], torch.long)
    # Left padding: the first real token is position 0. Leading pads are clamped to 0;
    # trailing pads (never attended by real tokens) repeat the last position.
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]


# --- reward model: Bradley-Terry ----------------------------------------------------------------


def test_bradley_terry_loss_hand_values():
    # Margin 0: -log sigmoid(0) = -log(1/2) = ln 2.
    close(bradley_terry_loss(t([0.7]), t([0.7])), LN2)
    # Margin ln 3: sigmoid(ln 3) = 3 / (3 + 1) = 3/4 -> -log(3/4) = ln(4/3).
    close(bradley_terry_loss(t([LN3]), t([0.0])), math.log(4 / 3))
    # Margin -ln 3: sigmoid = 1/4 -> ln 4. Mean over the two pairs: (ln(4/3) + ln 4) / 2.
    close(
        bradley_terry_loss(t([LN3, 1.0]), t([0.0, 1.0 + LN3])), (math.log(4 / 3) + math.log(4)) / 2
    )
    # Huge margins stay finite (logsigmoid, not log(sigmoid)).
    close(bradley_terry_loss(t([0.0]), t([200.0])), 200.0, atol=1e-4)
    close(bradley_terry_loss(t([200.0]), t([0.0])), 0.0)


def test_bradley_terry_gradient():
    chosen, rejected = t([LN3, 0.0]).requires_grad_(), t([0.0, 0.0]).requires_grad_()
    bradley_terry_loss(chosen, rejected).backward()
    # d/dc [-log sigmoid(c - r)] = -(1 - sigmoid(c - r)), divided by B = 2 for the mean:
    # pair 0: -(1 - 3/4) / 2 = -1/8; pair 1: -(1 - 1/2) / 2 = -1/4. Rejected: the opposite.
    close(chosen.grad, [-0.125, -0.25])
    close(rejected.grad, [0.125, 0.25])


def test_pair_stats_accuracy_and_margin():
    stats = pair_stats(t([2.0, 1.0, 0.5, 0.0]), t([0.0, 3.0, 0.5, -1.0]))
    # chosen > rejected: yes, no, tie (not counted), yes -> 2/4; margins 2, -2, 0, 1 -> 1/4.
    assert stats == {"accuracy": 0.5, "margin": 0.25}


# --- the reward model's score is read at the last real token -----------------------------------


@pytest.fixture(scope="module")
def seq_cls():
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        num_labels=1,
        pad_token_id=0,
    )
    return MistralForSequenceClassification(config).eval()


def test_sequence_scores_same_for_left_and_right_padding(seq_cls):
    left_ids, left_mask = pad_left([[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], pad_value=0)
    right_ids, right_mask = pad_right([[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], pad_value=0)
    with torch.no_grad():
        left = sequence_scores(seq_cls, left_ids, left_mask)
        right = sequence_scores(seq_cls, right_ids, right_mask)
        alone = sequence_scores(seq_cls, t([[5, 6, 7, 8]], torch.long), t([[1, 1, 1, 1]]))
    assert left.shape == (2,) and left.dtype == torch.float32
    close(left, right, atol=1e-5)
    close(left[:1], alone, atol=1e-5)  # padding does not change a row's score
    assert not torch.allclose(left[0], left[1])  # different sequences, different scores


def test_sequence_scores_match_the_models_own_pooling_on_right_padding(seq_cls):
    ids, mask = pad_right([[5, 6, 7], [8, 9, 10, 11, 12]], pad_value=0)
    with torch.no_grad():
        ours = sequence_scores(seq_cls, ids, mask)
        # Hugging Face pools at the last token that is not pad_token_id.
        theirs = seq_cls(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        # And not at the final column, which for row 0 is padding.
        every = seq_cls.score(seq_cls.model(input_ids=ids, attention_mask=mask).last_hidden_state)
    close(ours, theirs, atol=1e-5)
    close(ours[0], every[0, 2, 0], atol=1e-5)  # row 0's last real token is column 2
    assert not torch.allclose(ours[0], every[0, -1, 0])
