"""Loading and building the models of every phase (LoRA adapters: rlhf_ray/models/adapters.py).

Every phase directory (`base/`, `sft/`, `reward/`, `policy/`) is a standard Hugging Face model
directory with safetensors weights and the tokenizer, so any phase can start from any of them
with `from_pretrained`.

peft is not imported here: importing it costs ~2 s of CPU (it imports bitsandbytes, which
imports torch's compiler), and the roles that never build an adapter (reference model, reward
scorer, evaluation) start that much sooner without it (tests/test_layout.py keeps it so).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
    MistralConfig,
    PreTrainedTokenizerBase,
)

if TYPE_CHECKING:  # transformers' modeling code loads with the first model, not with this module
    from transformers import MistralForCausalLM, PreTrainedModel

from rlhf_ray.config import ModelConfig, QuantizationConfig
from rlhf_ray.data.tokenizer import load_tokenizer
from rlhf_ray.errors import ConfigError


@dataclass(frozen=True)
class FrozenModelSettings:
    """A model that is only read (reward scorer, reference model), and where it runs."""

    path: str  # the reward model directory, or the SFT model directory for the reference
    model: ModelConfig
    quantization: QuantizationConfig
    cpus: float
    gpus: float


_SMALLEST_VOCAB = 256 + 3  # the byte alphabet and <pad>, <s>, </s>
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_embedded_model(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, max_positions: int, seed: int
) -> MistralForCausalLM:
    """A small, randomly initialised Mistral-architecture causal LM (the untrained base)."""
    from transformers import MistralForCausalLM

    torch.manual_seed(seed)
    config = embedded_config(cfg, len(tokenizer), max_positions)
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return MistralForCausalLM(config)


def check_embedded_fits(cfg: ModelConfig) -> None:
    """Raise ConfigError when the embedded model's float32 weights alone exceed this machine's
    memory: it is built in the driver's process before any work (before: an allocation error,
    or the process killed by the kernel). Counted on its meta-device skeleton, at the smallest
    vocabulary the tokenizer trained on the data can have."""
    import psutil
    from transformers import MistralForCausalLM

    with torch.device("meta"):
        model = MistralForCausalLM(embedded_config(cfg, _SMALLEST_VOCAB, 1))
    parameters = sum(p.numel() for p in model.parameters())
    need, have = parameters * 4, psutil.virtual_memory().total
    if need > have:
        sizes = ", ".join(
            f"model.{key}={getattr(cfg, key)}"
            for key in ("hidden_size", "intermediate_size", "num_layers")
        )
        raise ConfigError(
            f"{sizes}: the embedded model would have at least {parameters:,} parameters, "
            f"{need / 2**30:,.1f} GiB of float32 weights, more than this machine's "
            f"{have / 2**30:,.1f} GiB of memory (and training needs several times its weights); "
            "choose smaller model sizes"
        )


def embedded_config(cfg: ModelConfig, vocab_size: int, max_positions: int) -> MistralConfig:
    """The embedded model's architecture (its special token ids are the tokenizer's)."""
    return MistralConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )


def _load_kwargs(model_cfg: ModelConfig, quant: QuantizationConfig) -> dict:
    kwargs = {
        "use_safetensors": True,
        "trust_remote_code": model_cfg.trust_remote_code,
        "dtype": DTYPES[model_cfg.dtype],
        # transformers 5 swaps layers for kernels it downloads from the hub where a GPU is seen,
        # and again on every train()/eval(): a download no cluster without the hub survives, and
        # other numerics for the policy (train mode) than for the reference (eval mode)
        "use_kernels": False,
    }
    if quant.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        )
        kwargs["dtype"] = DTYPES[quant.compute_dtype]
        if torch.cuda.is_available():  # 4-bit weights are quantised on the device they load to
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    return kwargs


def load_causal_lm(
    path: str | Path, model_cfg: ModelConfig, quant: QuantizationConfig
) -> PreTrainedModel:
    """A causal LM from a model directory or hub id, dropout off (DESIGN section 4)."""
    model = AutoModelForCausalLM.from_pretrained(str(path), **_load_kwargs(model_cfg, quant))
    disable_dropout(model)
    upcast_beside_4bit(model)
    return model


def load_scalar_model(
    path: str | Path, model_cfg: ModelConfig, quant: QuantizationConfig, pad_token_id: int
) -> PreTrainedModel:
    """A sequence-classification model with one scalar output (reward model, critic).

    Loaded from a causal LM directory (the SFT model) the `score` head starts random; loaded from
    the reward directory it is the trained head, which is how the critic starts from the RM.
    """
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, **_load_kwargs(model_cfg, quant)
    )
    model.config.pad_token_id = pad_token_id
    if not hasattr(model, "score"):
        raise ValueError(f"{path}: expected a sequence-classification model with a `score` head")
    disable_dropout(model)
    upcast_beside_4bit(model)
    return model


def upcast_beside_4bit(model: PreTrainedModel) -> None:
    """In a 4-bit model, the weights that are not 4-bit (norms, embeddings, lm_head, score) to
    float32, as peft's `prepare_model_for_kbit_training` casts those of every model it trains.
    Done at every 4-bit load, so the frozen reference computes what the policy computed before
    its first update (KL 0 at step 1), and not a bf16 variant of it."""
    if not getattr(model, "is_loaded_in_4bit", False):
        return
    for param in model.parameters():
        low = param.dtype in (torch.float16, torch.bfloat16)
        if low and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors only (the LoRA adapter, or all weights), detached on CPU."""
    return {
        name: p.detach().to("cpu", copy=True)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors from `trainable_state` into a model of the same structure, in place:
    every trainable parameter, and nothing else."""
    params = dict(model.named_parameters())
    unknown = [name for name in state if name not in params]
    if unknown:
        raise KeyError(f"weights for parameters this model does not have: {unknown[:3]}")
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise KeyError(f"no weights for trainable parameters: {missing[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def without_adapter(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper, or `model` itself. A PeftModel exists only
    where peft was imported, so this asks sys.modules instead of importing it."""
    peft = sys.modules.get("peft")
    return model.get_base_model() if peft and isinstance(model, peft.PeftModel) else model


def use_cpus(cpus: float) -> None:
    """Torch threads to match the CPUs Ray gave this role (at least one)."""
    torch.set_num_threads(max(1, int(cpus)))


def to_device(model: torch.nn.Module, num_gpus: float) -> torch.nn.Module:
    """Move a model to the GPU Ray assigned this role (4-bit models are placed at load)."""
    if (
        num_gpus > 0
        and torch.cuda.is_available()
        and not getattr(model, "is_loaded_in_4bit", False)
    ):
        return model.to("cuda")
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout probability to 0, LoRA's and the attention's included: train mode then
    computes the same function as eval mode (PPO needs identical logprobs in both) and keeps
    gradient checkpointing, which transformers only applies in train mode. (Attention dropout
    is a float the attention modules read in train mode, not a Dropout module.)"""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def load_frozen_causal_lm(settings: FrozenModelSettings) -> PreTrainedModel:
    """A causal LM in eval mode on the role's device, with threads matching its CPUs."""
    use_cpus(settings.cpus)
    model = load_causal_lm(settings.path, settings.model, settings.quantization)
    return to_device(model, settings.gpus).eval()


def load_frozen_scalar_model(settings: FrozenModelSettings) -> PreTrainedModel:
    """A scalar-head model (the reward model) in eval mode on the role's device."""
    use_cpus(settings.cpus)
    tok = load_tokenizer(settings.path, settings.model.trust_remote_code)
    model = load_scalar_model(
        settings.path, settings.model, settings.quantization, tok.pad_token_id
    )
    return to_device(model, settings.gpus).eval()
