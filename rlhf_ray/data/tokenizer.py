"""Tokenizers: a byte-level BPE trained on the run's own data, or a Hugging Face one.

Both come out with a pad token: distinct from EOS where the tokenizer has one to spare, or EOS
itself (Qwen's and Llama 3's tokenizers have no other), as transformers and TRL accept. Every
model input here carries its attention mask and every response its mask, cut after the first
EOS, so a pad equal to EOS is never taken for either.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from rlhf_ray.data.chat import EMBEDDED_CHAT_TEMPLATE

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) with <pad>, <s>, </s> as ids 0, 1, 2, and a chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD, bos_token=BOS, eos_token=EOS)
    tok.chat_template = EMBEDDED_CHAT_TEMPLATE
    return tok


def load_tokenizer(
    path: str, trust_remote_code: bool = False, chat_template: str | None = None
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has EOS and a pad token; `chat_template`
    (data.chat_template) replaces its own, so the directories it is saved to carry it.

    Llama/Mistral tokenizers ship no pad token; their <unk> is a safe distinct pad (it never
    appears in real text), so no embedding row has to be added. Without one, EOS pads.
    """
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise ValueError(
            f"tokenizer at {path} has no EOS token, so a response could never end; set "
            "eos_token in its tokenizer_config.json (or use the model's chat/instruct tokenizer)"
        )
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        distinct_unk = tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id
        tok.pad_token = tok.unk_token if distinct_unk else tok.eos_token
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
