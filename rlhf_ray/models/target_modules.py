"""`lora.target_modules` checked against the model's own module names before any work.

PEFT finds a wrong name only when it builds the first adapter, which for a full fine-tune is in
PPO, after SFT and the reward model have trained. The model's skeleton is built on the meta
device from its config (no weights are read, no memory is taken), so the check costs a second.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from rlhf_ray.config import LoraConfig
from rlhf_ray.errors import ConfigError

# The layer types PEFT's LoRA can adapt
ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)


def check_target_modules(lora: LoraConfig, model_path: str, trust_remote_code: bool) -> None:
    """Raise ConfigError naming each entry of `lora.target_modules` that matches no adaptable
    module of the model at `model_path`, with the model's linear module names to choose from."""
    modules = adaptable_modules(model_path, trust_remote_code)
    unmatched = [t for t in lora.target_modules if not any(_matches(n, t) for n in modules)]
    if unmatched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if m is torch.nn.Linear})
        raise ConfigError(
            f"lora.target_modules={list(lora.target_modules)}: "
            f"{', '.join(repr(t) for t in unmatched)} matches no module of the model "
            f"{model_path}; its linear modules: {', '.join(linear)}"
        )


def adaptable_modules(model_path: str, trust_remote_code: bool) -> dict[str, type]:
    """Full module name -> layer type, for every layer of the model that LoRA can adapt."""
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, ADAPTABLE)}


def _matches(module_name: str, target: str) -> bool:
    """PEFT's rule for a list of names: the whole name, or its last dotted parts."""
    return module_name == target or module_name.endswith(f".{target}")
