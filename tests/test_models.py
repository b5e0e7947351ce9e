"""Tests for rlhf_ray.models and rlhf_ray.data.tokenizer on a tiny Mistral saved to tmp_path.

The 4-bit tests run bitsandbytes on CPU (supported since bitsandbytes 0.48).
"""

import json
import shutil

import pytest
import torch
from peft import PeftModel, TaskType
from tokenizers import Tokenizer
from tokenizers import models as tok_models
from transformers import AutoModelForCausalLM, MistralForCausalLM, PreTrainedTokenizerFast

from rlhf_ray.config import LoraConfig, ModelConfig, QuantizationConfig
from rlhf_ray.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from rlhf_ray.models.adapters import add_lora, save_merged, write_adapter
from rlhf_ray.models.loading import (
    build_embedded_model,
    load_causal_lm,
    load_scalar_model,
    load_trainable_state,
    trainable_state,
)

# hidden 64: bitsandbytes' CPU 4-bit kernels need in_features to be a multiple of its block (64).
MODEL = ModelConfig(
    hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1
)
LORA = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
FLOAT = QuantizationConfig(load_in_4bit=False)
IDS = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 10, 11, 12, 13, 14]])
MASK = torch.ones_like(IDS)


@pytest.fixture(scope="module")
def tok():
    texts = ["User: What is the capital of France?\nAssistant: The capital of France is Paris."]
    return train_bpe_tokenizer(texts * 5, vocab_size=300)


@pytest.fixture(scope="module")
def base_dir(tok, tmp_path_factory):
    """A tiny embedded Mistral and its tokenizer, saved as a Hugging Face model directory."""
    path = tmp_path_factory.mktemp("base")
    build_embedded_model(MODEL, tok, max_positions=32, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def lora_model(path, quant=FLOAT):
    return add_lora(load_causal_lm(path, MODEL, quant), LORA, TaskType.CAUSAL_LM, False)


def perturb_lora(model, seed):
    """LoRA B starts at zero (the adapter is a no-op); give the adapter weights that matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits.float()


# --- the embedded base ----------------------------------------------------------------------------


def test_build_embedded_model_uses_the_configured_sizes(tok):
    model = build_embedded_model(MODEL, tok, max_positions=48, seed=0)
    assert isinstance(model, MistralForCausalLM)
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 128, 1)
    assert (c.num_attention_heads, c.num_key_value_heads) == (2, 1)
    assert c.vocab_size == len(tok) and c.max_position_embeddings == 48
    assert model.get_input_embeddings().weight.shape == (len(tok), 64)
    # <pad>, <s>, </s> are ids 0, 1, 2: pad is not EOS, so a left-padded prompt is not "finished".
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (0, 1, 2)
    assert c.pad_token_id != c.eos_token_id


def test_build_embedded_model_is_seeded(tok):
    a = build_embedded_model(MODEL, tok, 32, seed=0).state_dict()
    b = build_embedded_model(MODEL, tok, 32, seed=0).state_dict()
    c = build_embedded_model(MODEL, tok, 32, seed=1).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[name], b[name])
    assert not torch.equal(a[name], c[name])


# --- LoRA on a float model ------------------------------------------------------------------------


def test_lora_trains_only_the_adapter(base_dir):
    model = lora_model(base_dir)
    out = model(input_ids=IDS, attention_mask=MASK).logits
    out.pow(2).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    # r=4 on q_proj and v_proj of 1 layer: lora_A and lora_B of each -> 4 tensors.
    assert len(trainable) == 4 and all("lora_" in n for n in trainable)


def test_trainable_state_round_trip_between_two_lora_copies(base_dir):
    a, b = lora_model(base_dir), lora_model(base_dir)
    before_b = logits(b)
    torch.testing.assert_close(logits(a), before_b)  # same base, zero-initialised LoRA B
    perturb_lora(a, seed=0)
    expected = logits(a)
    assert not torch.allclose(expected, before_b, atol=1e-3)

    state = trainable_state(a)
    assert set(state) == {n for n, p in a.named_parameters() if p.requires_grad}
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    load_trainable_state(b, state)
    torch.testing.assert_close(logits(b), expected, atol=1e-6, rtol=0)

    # The state is a copy: changing the model afterwards does not change it.
    before = {n: t.clone() for n, t in state.items()}
    perturb_lora(a, seed=1)
    assert all(torch.equal(state[n], before[n]) for n in state)


def test_load_trainable_state_rejects_unknown_names(base_dir):
    model = lora_model(base_dir)
    with pytest.raises(KeyError, match="not_a_param"):
        load_trainable_state(model, {"not_a_param": torch.zeros(1)})


def test_save_merged_is_a_plain_model_with_the_adapter_folded_in(base_dir, tok, tmp_path):
    model = lora_model(base_dir)
    perturb_lora(model, seed=2)
    expected = logits(model)  # before saving: merging changes the wrapped modules in place
    save_merged(model, tok, tmp_path / "out")

    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", use_safetensors=True)
    assert not isinstance(merged, PeftModel)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=0)
    assert load_tokenizer(str(tmp_path / "out")).pad_token_id == tok.pad_token_id


def test_load_scalar_model_from_a_causal_lm_directory(base_dir, tok):
    model = load_scalar_model(base_dir, MODEL, FLOAT, pad_token_id=tok.pad_token_id)
    assert model.score.weight.shape == (1, 64)  # one scalar from the hidden state
    assert model.config.pad_token_id == 0 and model.config.num_labels == 1
    assert all(not isinstance(m, torch.nn.Dropout) or m.p == 0.0 for m in model.modules())


# --- 4-bit (QLoRA) on CPU -------------------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_four_bit_lora_forward_backward_on_cpu(base_dir, compute_dtype):
    bnb = pytest.importorskip("bitsandbytes")
    quant = QuantizationConfig(load_in_4bit=True, compute_dtype=compute_dtype)
    model = lora_model(base_dir, quant)
    assert model.is_loaded_in_4bit
    base = model.get_base_model()
    quantised = [n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    # Every projection of the 1 decoder layer: q, k, v, o, gate, up, down = 7.
    assert len(quantised) == 7
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.quant_type == "nf4"

    out = model(input_ids=IDS, attention_mask=MASK).logits
    assert out.shape == (2, 6, len(load_tokenizer(str(base_dir))))
    assert torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert len(with_grad) == 4 and all("lora_" in n for n in with_grad)
    assert all(torch.isfinite(model.get_parameter(n).grad).all() for n in with_grad)


def test_four_bit_save_merged_reloads_the_base_in_full_precision(base_dir, tok, tmp_path):
    pytest.importorskip("bitsandbytes")
    qlora = lora_model(base_dir, QuantizationConfig(load_in_4bit=True, compute_dtype="float32"))
    perturb_lora(qlora, seed=3)
    save_merged(qlora, tok, tmp_path / "out", reload_base=base_dir, model_cfg=MODEL)

    # The same adapter on the float base is what the merged model must compute.
    reference = lora_model(base_dir)
    load_trainable_state(reference, trainable_state(qlora))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", use_safetensors=True)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg
    torch.testing.assert_close(logits(merged), logits(reference), atol=1e-4, rtol=0)


QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
STACKINGS = {  # SFT adapter, PPO adapter, how the policy's base is loaded
    "as the project trains them": (LORA, LORA, FLOAT),
    "other ranks and alphas": (LORA, LoraConfig(r=8, alpha=32, dropout=0.0), FLOAT),
    "other target modules": (
        LORA,
        LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=QKVO),
        FLOAT,
    ),
    "a 4-bit policy": (LORA, LORA, QuantizationConfig(load_in_4bit=True, compute_dtype="float32")),
}


@pytest.mark.parametrize("case", list(STACKINGS))
def test_sft_and_ppo_adapters_ship_stacked_on_the_base_model(base_dir, tok, tmp_path, case):
    """The policy's adapter alone (PPO's, trained on the merged SFT model) stacked onto SFT's:
    one rank r1 + r2 adapter on the original base computes what the merged policy computes,
    whatever the two adapters' ranks, alphas and target modules, and from a 4-bit policy."""
    sft_lora, ppo_lora, quant = STACKINGS[case]
    if quant.load_in_4bit:
        pytest.importorskip("bitsandbytes")
    sft = add_lora(load_causal_lm(base_dir, MODEL, FLOAT), sft_lora, TaskType.CAUSAL_LM, False)
    perturb_lora(sft, seed=1)
    save_merged(sft, tok, tmp_path / "sft")
    policy = add_lora(
        load_causal_lm(tmp_path / "sft", MODEL, quant), ppo_lora, TaskType.CAUSAL_LM, False
    )
    perturb_lora(policy, seed=2)
    trained = logits(policy)
    out = tmp_path / "policy"
    save_merged(policy, tok, out, tmp_path / "sft", MODEL, stack_on=tmp_path / "sft" / "adapter")

    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (sft_lora.r + ppo_lora.r,) * 2  # scaling 1
    assert config["base_model_name_or_path"] == str(base_dir)
    assert set(config["target_modules"]) == set(sft_lora.target_modules + ppo_lora.target_modules)
    stacked = PeftModel.from_pretrained(load_causal_lm(base_dir, MODEL, FLOAT), out / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    torch.testing.assert_close(logits(stacked), logits(merged), atol=1e-5, rtol=0)
    if not quant.load_in_4bit:  # the policy as it trained (4-bit computes otherwise)
        torch.testing.assert_close(logits(stacked), trained, atol=1e-5, rtol=0)
    assert not torch.allclose(logits(stacked), logits(load_causal_lm(base_dir, MODEL, FLOAT)))


# --- tokenizers ----------------------------------------------------------------------------------


def test_load_tokenizer_keeps_a_pad_distinct_from_eos(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert (loaded.pad_token, loaded.eos_token) == ("<pad>", "</s>")
    assert loaded.pad_token_id == 0 != loaded.eos_token_id == 2


def word_tokenizer(tmp_path, **special):
    """A tiny word-level tokenizer saved to tmp_path with the given special tokens."""
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2}
    core = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=core, **special).save_pretrained(tmp_path)
    return str(tmp_path)


def test_load_tokenizer_uses_unk_when_pad_is_eos(tmp_path):
    # Like Llama/Mistral: no pad of its own (here pad == EOS), but an <unk> to pad with.
    path = word_tokenizer(tmp_path, eos_token="</s>", pad_token="</s>", unk_token="<unk>")
    loaded = load_tokenizer(path)
    assert (loaded.pad_token, loaded.pad_token_id, loaded.eos_token_id) == ("<unk>", 0, 1)


@pytest.mark.gpu_path  # what a GPU user's first small hub model (Qwen2.5) needs
def test_load_tokenizer_refuses_no_eos_and_pads_with_eos_when_nothing_else_is_there(tmp_path):
    """Like Qwen's and Llama 3's: pad equal to EOS (or none) and no <unk>: EOS pads, as in
    transformers and TRL (masks, not ids, say where padding is)."""
    with pytest.raises(ValueError, match="no EOS token"):
        load_tokenizer(word_tokenizer(tmp_path / "a", unk_token="<unk>"))
    no_pad = load_tokenizer(word_tokenizer(tmp_path / "b", eos_token="</s>"))
    assert no_pad.pad_token_id == no_pad.eos_token_id == 1
    pad_is_eos = load_tokenizer(word_tokenizer(tmp_path / "c", eos_token="</s>", pad_token="</s>"))
    assert pad_is_eos.pad_token_id == pad_is_eos.eos_token_id == 1


class _WritesAFileWhenUnpickled:
    """A payload: unpickling it opens (creates) `path`, as a malicious checkpoint could."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("loader", ["causal", "scalar"])
def test_a_pickled_checkpoint_is_refused_and_never_unpickled(base_dir, tmp_path, loader):
    """A model directory with a pickle (`pytorch_model.bin`) and no safetensors weights."""
    model_dir, marker = tmp_path / "model", tmp_path / "payload-ran"
    model_dir.mkdir()
    shutil.copy(base_dir / "config.json", model_dir)
    torch.save({"weights": _WritesAFileWhenUnpickled(str(marker))}, model_dir / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        if loader == "causal":
            load_causal_lm(model_dir, MODEL, QuantizationConfig())
        else:
            load_scalar_model(model_dir, MODEL, QuantizationConfig(), pad_token_id=0)
    assert not marker.exists()


def test_synced_lora_tensors_written_as_a_peft_adapter_load_as_the_same_policy(base_dir, tmp_path):
    """What a vLLM generator serves: the learner's trainable tensors as a PEFT directory."""
    policy = lora_model(base_dir)
    perturb_lora(policy, seed=3)
    tensors = trainable_state(policy)
    write_adapter(tensors, LORA, str(base_dir), tmp_path / "v7")
    loaded = PeftModel.from_pretrained(load_causal_lm(base_dir, MODEL, FLOAT), tmp_path / "v7")
    config = json.loads((tmp_path / "v7" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (
        4,
        8,
        str(base_dir),
    )
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    # Loaded for inference, so none of its tensors is trainable: read the LoRA ones by name
    loaded_lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert set(loaded_lora) == set(tensors) and len(tensors) == 4  # A and B of q_proj, v_proj
    for name, tensor in loaded_lora.items():
        assert torch.equal(tensor, tensors[name]), name
    torch.testing.assert_close(logits(loaded), logits(policy), atol=0, rtol=0)
    with pytest.raises(ValueError, match="only the LoRA matrices"):
        write_adapter({"score.weight": torch.zeros(1, 64)}, LORA, str(base_dir), tmp_path / "x")
