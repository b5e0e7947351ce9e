"""`lora.target_modules` checked against the model's own module names before any work.

PEFT finds a wrong name only when it builds the first adapter, which for a full fine-tune is in
PPO, after SFT and the reward model have trained. The model's skeleton is built on the meta
device from its config (no weights are read, no memory is taken), so the check costs a second;
the embedded model's from the settings it will be built with, so a wrong name is refused before
anything (its tokenizer, its weights) is written.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from rlhf_ray.config import LoraConfig, ModelConfig
from rlhf_ray.errors import ConfigError
from rlhf_ray.models.loading import embedded_config

# The layer types PEFT's LoRA can adapt
ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
_SKELETON_POSITIONS = 64  # the embedded model's position count does not change its modules


def check_target_modules(lora: LoraConfig, model: ModelConfig) -> None:
    """Raise ConfigError naming each entry of `lora.target_modules` that matches no adaptable
    module of the base model `model` names, with the model's linear module names to choose
    from. A model directory or hub id must have passed `check_model_source`."""
    modules = adaptable_modules(_model_config(model), model.trust_remote_code)
    unmatched = [t for t in lora.target_modules if not any(_matches(n, t) for n in modules)]
    if unmatched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if m is torch.nn.Linear})
        which = "the embedded model" if model.is_embedded else f"the model {model.name_or_path}"
        raise ConfigError(
            f"lora.target_modules={list(lora.target_modules)}: "
            f"{', '.join(repr(t) for t in unmatched)} matches no module of {which}; "
            f"its linear modules: {', '.join(linear)}"
        )


def adaptable_modules(config: PretrainedConfig, trust_remote_code: bool) -> dict[str, type]:
    """Full module name -> layer type, for every layer of the model that LoRA can adapt."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, ADAPTABLE)}


def _model_config(model: ModelConfig) -> PretrainedConfig:
    if model.is_embedded:
        return embedded_config(model, model.vocab_size, _SKELETON_POSITIONS)
    return AutoConfig.from_pretrained(model.name_or_path, trust_remote_code=model.trust_remote_code)


def _matches(module_name: str, target: str) -> bool:
    """PEFT's rule for a list of names: the whole name, or its last dotted parts."""
    return module_name == target or module_name.endswith(f".{target}")
