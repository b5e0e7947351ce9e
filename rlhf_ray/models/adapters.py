"""LoRA adapters: added to a model for training, merged into it when saved, and saved alone in
PEFT format beside the merged model: what a 7B user ships. The one module of the library that
imports peft at the top (rlhf_ray/models/loading.py says why the others don't).

`<phase dir>/adapter/` loads with `PeftModel.from_pretrained(base, dir)` onto the model named in
its adapter_config.json. The policy's PPO adapter was trained on the merged SFT model; when SFT
was LoRA too, the two are stacked into one adapter on the original base model:

    W_policy = W_base + s1 * B1 @ A1 + s2 * B2 @ A2 = W_base + [s1*B1, s2*B2] @ [A1; A2]

a rank r1 + r2 adapter with scaling 1 (alpha = r1 + r2), exact up to float rounding, so the
policy ships as megabytes on the public base model instead of gigabytes of merged weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_ray.config import LoraConfig, ModelConfig
from rlhf_ray.models.loading import DTYPES
from rlhf_ray.models.source import ADAPTER_DIR

_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"


def add_lora(
    model: PreTrainedModel, lora: LoraConfig, task: TaskType, gradient_checkpointing: bool
) -> PeftModel:
    """Wrap a model with a trainable LoRA adapter (and the k-bit preparation QLoRA needs)."""
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return get_peft_model(model, peft_lora_config(lora, task))


def save_merged(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    reload_base: str | Path | None = None,
    model_cfg: ModelConfig | None = None,
) -> None:
    """Save a standard model directory, with any LoRA adapter merged into the weights and also
    saved alone in `adapter/` (PEFT format).

    4-bit weights cannot absorb an adapter, so for QLoRA the base is reloaded in `model.dtype`
    from `reload_base`, the saved adapter loaded onto it, and that merged.
    """
    if isinstance(model, PeftModel):
        save_adapter(model, out_dir)
        if getattr(model, "is_loaded_in_4bit", False):
            inner = model.get_base_model()
            base = type(inner).from_pretrained(
                str(reload_base),
                num_labels=inner.config.num_labels,
                dtype=DTYPES[model_cfg.dtype],
                use_safetensors=True,
            )
            base.config.pad_token_id = tokenizer.pad_token_id
            model = PeftModel.from_pretrained(base, out_dir / ADAPTER_DIR)
        model = model.merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def save_adapter(model: PeftModel, out_dir: Path) -> None:
    """The adapter alone (and any head PEFT trains beside it) into `out_dir/adapter`. PEFT's
    blank card template is removed: the phase directory's own README.md describes the adapter."""
    model.save_pretrained(out_dir / ADAPTER_DIR, safe_serialization=True)
    (out_dir / ADAPTER_DIR / "README.md").unlink(missing_ok=True)


def peft_lora_config(lora: LoraConfig, task: TaskType, base: str | None = None) -> PeftLoraConfig:
    """PEFT's LoRA settings for our `lora` section (`base`: the model it applies to)."""
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task,
        base_model_name_or_path=base,
    )


def write_adapter(
    tensors: dict[str, torch.Tensor], lora: LoraConfig, base: str, out_dir: Path
) -> None:
    """A policy's trainable LoRA tensors, named as in `model.named_parameters()` of the PEFT
    model, as the PEFT adapter directory `save_pretrained` would write (which vLLM loads):
    the same names less the adapter's name ("...q_proj.lora_A.default.weight" is saved as
    "...q_proj.lora_A.weight")."""
    saved = {}
    for name, tensor in tensors.items():
        if ".lora_A.default." not in name and ".lora_B.default." not in name:
            raise ValueError(f"{name}: expected only the LoRA matrices of the default adapter")
        saved[name.replace(".default.", ".")] = tensor.contiguous()
    out_dir.mkdir(parents=True)
    save_file(saved, str(out_dir / _WEIGHTS))
    peft_lora_config(lora, TaskType.CAUSAL_LM, base).save_pretrained(str(out_dir))


def stack_onto(first: Path, second: Path) -> bool:
    """Replace adapter `second` (trained on the model `first` was merged into) by one adapter
    on `first`'s base model. False (and `second` kept as it is) when they cannot be stacked:
    other target modules, or parts that are not LoRA matrices (a trained head)."""
    config1, config2 = (json.loads((d / _CONFIG).read_text()) for d in (first, second))
    if not _stackable(config1, config2):
        return False
    weights1, weights2 = (load_file(str(d / _WEIGHTS)) for d in (first, second))
    lora_only = all(".lora_A." in k or ".lora_B." in k for k in weights1)
    if weights1.keys() != weights2.keys() or not lora_only:
        return False
    s1, s2 = _scaling(config1), _scaling(config2)
    stacked = {}
    for name, a_or_b in weights1.items():
        if ".lora_A." in name:  # (r, in): rows stack
            stacked[name] = torch.cat([a_or_b, weights2[name]], dim=0)
        else:  # lora_B (out, r): columns stack, each scaled by its own alpha / r
            stacked[name] = torch.cat([s1 * a_or_b, s2 * weights2[name]], dim=1)
    rank = config1["r"] + config2["r"]
    config = dict(config2, r=rank, lora_alpha=rank, use_rslora=False)
    config["base_model_name_or_path"] = config1["base_model_name_or_path"]
    shutil.rmtree(second)
    second.mkdir()
    save_file({k: v.contiguous() for k, v in stacked.items()}, str(second / _WEIGHTS))
    (second / _CONFIG).write_text(json.dumps(config, indent=2))
    return True


def _stackable(config1: dict, config2: dict) -> bool:
    def plain(c: dict) -> bool:
        return (
            c.get("peft_type") == "LORA"
            and not c.get("modules_to_save")
            and not c.get("rank_pattern")
            and not c.get("alpha_pattern")
        )

    same_targets = sorted(config1["target_modules"]) == sorted(config2["target_modules"])
    return plain(config1) and plain(config2) and same_targets


def _scaling(config: dict) -> float:
    root = config["r"] ** 0.5 if config.get("use_rslora") else config["r"]
    return config["lora_alpha"] / root
