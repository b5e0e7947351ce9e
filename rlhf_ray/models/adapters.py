"""LoRA adapters: added to a model for training, merged into it when saved, and saved alone in
PEFT format beside the merged model: what a 7B user ships. The one module of the library that
imports peft at the top (rlhf_ray/models/loading.py says why the others don't).

`<phase dir>/adapter/` loads with `PeftModel.from_pretrained(base, dir)` onto the model named in
its adapter_config.json. The policy's PPO adapter was trained on the merged SFT model; when SFT
was LoRA too, the two are stacked into one adapter on the original base model:

    W_policy = W_base + s1 * B1 @ A1 + s2 * B2 @ A2 = W_base + [s1*B1, s2*B2] @ [A1; A2]

a rank r1 + r2 adapter with scaling 1 (alpha = r1 + r2), exact up to float rounding, so the
policy ships as megabytes on the public base model instead of gigabytes of merged weights.
PEFT builds it (`add_weighted_adapter`, "cat"), for adapters of any ranks and target modules.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_ray.config import LoraConfig, ModelConfig
from rlhf_ray.models.loading import DTYPES
from rlhf_ray.models.source import ADAPTER_DIR

_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"
_FIRST, _STACKED = "stack-first", "stacked"  # adapter names, only while stacking


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
    stack_on: Path | None = None,
) -> None:
    """Save a standard model directory, with any LoRA adapter merged into the weights and also
    saved alone in `adapter/` (PEFT format). `stack_on`: the adapter that was merged into the
    model's base (SFT's, for the policy); the adapter saved alone is then the two stacked into
    one on that adapter's base model, where they stack (`stack_onto`).

    4-bit weights cannot absorb an adapter, so for QLoRA the base is reloaded in `model.dtype`
    from `reload_base`, the saved adapter loaded onto it, and that merged.
    """
    if isinstance(model, PeftModel):
        save_adapter(model, out_dir)
        to_merge = model
        if getattr(model, "is_loaded_in_4bit", False):
            to_merge = _reloaded_with_adapter(model, tokenizer, out_dir, reload_base, model_cfg)
        if stack_on is not None:  # before merging: merge_and_unload takes the adapter out of model
            stack_onto(model, stack_on, out_dir / ADAPTER_DIR)
        model = to_merge.merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _reloaded_with_adapter(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    reload_base: str | Path,
    model_cfg: ModelConfig,
) -> PeftModel:
    """The 4-bit model's base reloaded in `model_cfg.dtype`, with the adapter saved in out_dir."""
    inner = model.get_base_model()
    base = type(inner).from_pretrained(
        str(reload_base),
        num_labels=inner.config.num_labels,
        dtype=DTYPES[model_cfg.dtype],
        use_safetensors=True,
    )
    base.config.pad_token_id = tokenizer.pad_token_id
    return PeftModel.from_pretrained(base, out_dir / ADAPTER_DIR)


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


def stack_onto(model: PeftModel, first: Path, second: Path) -> bool:
    """Replace adapter `second`, saved from `model`'s active adapter (trained on the model that
    `first` was merged into), by one adapter on `first`'s base model: PEFT's
    `add_weighted_adapter(combination_type="cat")`, on `model` for its module structure alone
    (the base weights play no part; only adapter-sized tensors are added, then removed again).
    False (and `second` kept as it is) when they cannot be stacked: a part that is not LoRA
    matrices (a trained head), or rsLoRA scaling, which PEFT's "cat" keeps on the sum adapter
    (scaling alpha / sqrt(r) = sqrt(r1 + r2) instead of 1; the project trains none)."""
    configs = [json.loads((d / _CONFIG).read_text()) for d in (first, second)]
    if not all(_stackable(c) for c in configs):
        return False
    trained = model.active_adapter
    model.load_adapter(str(first), adapter_name=_FIRST)
    # (r1 + r2) rows of A as [A1; A2], columns of B as [s1*B1, s2*B2], alpha = r1 + r2: exact
    model.add_weighted_adapter([_FIRST, trained], [1.0, 1.0], _STACKED, combination_type="cat")
    staging = second.with_name(f"{second.name}.stacked")
    model.save_pretrained(staging, selected_adapters=[_STACKED], safe_serialization=True)
    for name in (_FIRST, _STACKED):
        model.delete_adapter(name)
    model.set_adapter(trained)
    shutil.rmtree(second)
    (staging / _STACKED).rename(second)  # PEFT saves an adapter not named "default" in a folder
    shutil.rmtree(staging)
    (second / "README.md").unlink(missing_ok=True)
    return True


def _stackable(config: dict) -> bool:
    return (
        config.get("peft_type") == "LORA"
        and not config.get("modules_to_save")
        and not config.get("use_rslora")
    )
