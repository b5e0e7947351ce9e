"""A short model card (README.md, Hugging Face's format) in every phase directory: what phase,
which base model, which data, the settings that shaped it, and its measured numbers.

Written by the driver once a phase is complete (the card is not part of the atomic phase output)
and refreshed after the evaluation, which adds the gold judge's numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_ray.config import Config
from rlhf_ray.models.source import ADAPTER_DIR
from rlhf_ray.run import metrics
from rlhf_ray.run.checkpoints import is_complete, phase_dir, read_metrics

CARD_FILE = "README.md"
_TITLES = {
    "sft": ("Supervised fine-tuning (SFT)", "sft", "the demonstrations"),
    "reward": ("Reward model", "reward-model", "the preference pairs"),
    "ppo": ("RLHF policy (PPO)", "ppo", "the RL prompts, scored by the reward model"),
}
_DATA = {"sft": ("sft",), "reward": ("preferences", "preferences_eval"), "ppo": ("prompts",)}
_GOLD = {
    "sft": ("gold_reward_sft",),
    "ppo": ("gold_reward_policy", "win_rate_vs_sft", "gap_closed"),
}


def write_cards(cfg: Config, out: Path, data_report: dict, summary: dict | None = None) -> None:
    """A card in each complete phase directory (replacing an older one)."""
    for phase in _TITLES:
        folder = phase_dir(out, phase)
        if is_complete(folder):
            card = model_card(cfg, phase, folder, data_report, summary or {})
            (folder / CARD_FILE).write_text(card, encoding="utf-8")


def model_card(cfg: Config, phase: str, folder: Path, data_report: dict, summary: dict) -> str:
    title, tag, data_words = _TITLES[phase]
    base = cfg.model.name_or_path
    lines = ["---", "library_name: transformers", f"tags: [rlhf-ray, rlhf, {tag}]"]
    if not cfg.model.is_embedded:
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {title}", ""]
    lines.append(
        f"Trained by rlhf-ray on {data_words}, starting from "
        f"{'the embedded model built from config' if cfg.model.is_embedded else base}."
    )
    lines += ["", "## Load", "", "```python", *_load_code(phase, folder), "```", ""]
    lines += ["## Data", ""] + [_data_line(n, data_report[n]) for n in _DATA[phase]] + [""]
    lines += ["## Settings", ""] + [f"- {k}: {v}" for k, v in _settings(cfg, phase).items()]
    lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
    measured = _headline(phase, read_metrics(folder))
    measured.update({k: summary[k] for k in _GOLD.get(phase, ()) if summary.get(k) is not None})
    lines += [f"| {k} | {_fmt(v)} |" for k, v in measured.items()]
    return "\n".join(lines) + "\n"


def _load_code(phase: str, folder: Path) -> list[str]:
    auto = "AutoModelForSequenceClassification" if phase == "reward" else "AutoModelForCausalLM"
    code = [
        f"from transformers import {auto}, AutoTokenizer",
        f'model = {auto}.from_pretrained("{folder.name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{folder.name}")  # with its chat template',
    ]
    adapter = folder / ADAPTER_DIR / "adapter_config.json"
    if adapter.is_file():
        on = json.loads(adapter.read_text())["base_model_name_or_path"]
        code += [
            "# or the LoRA adapter alone, on the model it was trained on:",
            "from peft import PeftModel",
            f'model = PeftModel.from_pretrained({auto}.from_pretrained("{on}"), '
            f'"{folder.name}/{ADAPTER_DIR}")',
        ]
    return code


def _data_line(name: str, info: dict) -> str:
    return f"- {name}: {info['rows']} {info['format']} rows from {info['source']}"


def _settings(cfg: Config, phase: str) -> dict:
    lora = f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {', '.join(cfg.lora.target_modules)}"
    quant = cfg.quantization.load_in_4bit and f"4-bit {cfg.quantization.quant_type}"
    common = {
        "quantization": quant or "none",
        "max tokens (prompt, completion)": (
            cfg.data.max_prompt_tokens,
            cfg.data.max_completion_tokens,
        ),
    }
    if phase == "sft":
        s = cfg.sft
        method = lora if s.method == "lora" else "full fine-tuning"
        return {
            "method": method,
            "epochs": s.epochs,
            "lr": s.lr,
            "batch_size": s.batch_size,
            **common,
        }
    if phase == "reward":
        r = cfg.reward
        method = lora if r.method == "lora" else "full fine-tuning"
        return {"method": method, "loss": "Bradley-Terry", "epochs": r.epochs, "lr": r.lr, **common}
    p = cfg.ppo
    return {
        "method": lora,
        "estimator": p.estimator,
        "steps": p.steps,
        "rollouts_per_step": p.rollouts_per_step,
        "kl_coef": p.kl_coef,
        "lr": p.lr,
        **common,
    }


def _headline(phase: str, values: dict) -> dict:
    """The phase's numbers (PPO's: its objective at the last step, length, speed, steps)."""
    numbers = {k: v for k, v in values.items() if isinstance(v, (int, float))}
    if phase != "ppo":
        return numbers
    keep = (metrics.SCORES, metrics.KL, metrics.RLHF_REWARD, metrics.RESPONSE_LENGTH)
    return {k: v for k, v in numbers.items() if k in keep or k in (metrics.TOKENS_PER_S, "steps")}


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
