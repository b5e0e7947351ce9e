"""The settings each phase's result depends on, recorded so that a rerun with other settings is
never silently mixed with what an earlier run left in the same output_dir.

`<output_dir>/phase_settings/<phase>.json` is written when a phase starts (for the embedded base
model, when it is built) and compared on every later run with the same output_dir. A phase's
settings include those of the phases it builds on, so a change to SFT is a change to the reward
model and PPO too. Settings that change how a run is carried out but not what it learns (paths,
checkpoint cadence, restarts, generator count, memory savers) are left out; data enter as the
SHA-256 of the rows the phase trains on, whatever file they came from.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

from rlhf_ray.config import Config
from rlhf_ray.data import chat
from rlhf_ray.errors import ConfigError

SETTINGS_DIR = "phase_settings"
ORDER = ("base", "sft", "reward", "ppo")  # each builds on the ones before it
# How a run is carried out, not what it learns: a change to these never invalidates outputs.
OPERATIONAL = {
    "model.trust_remote_code",
    "model.gradient_checkpointing",
    "ppo.num_rollout_actors",
    "ppo.max_role_restarts",
    "ppo.max_learner_restarts",
    "ppo.checkpoint_every",
    "ppo.keep_checkpoints",
}
# What builds the embedded model alone: a hub model or directory brings its own shape
_EMBEDDED_ONLY = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
)
_DATA_LIMITS = ("prompt_template", "max_prompt_tokens", "max_completion_tokens", "overlong")


def _section(cfg: Config, name: str) -> dict:
    values = dataclasses.asdict(getattr(cfg, name))
    return {
        f"{name}.{key}": list(v) if isinstance(v, tuple) else v
        for key, v in values.items()
        if f"{name}.{key}" not in OPERATIONAL
    }


def _rows_digest(data_dir: Path, name: str) -> str:
    return hashlib.sha256((data_dir / f"{name}.jsonl").read_bytes()).hexdigest()


def base_settings(cfg: Config, corpus_sha256: str) -> dict:
    """What the embedded base model is built from: its shape and seed, and the texts its
    tokenizer learned from (every data row: another row count, seed or file is another base)."""
    model = {f"model.{k}": getattr(cfg.model, k) for k in _EMBEDDED_ONLY}
    positions = cfg.data.max_prompt_tokens + cfg.data.max_completion_tokens
    return {
        **model,
        "model.max_positions": positions,
        "run.seed": cfg.run.seed,
        "data.tokenizer_corpus_sha256": corpus_sha256,
    }


def _model(cfg: Config) -> dict:
    """The model section less, for a hub model or directory, the embedded model's shape
    (`_EMBEDDED_ONLY`), which nothing reads then."""
    model = _section(cfg, "model")
    if cfg.model.is_embedded:
        return model
    return {k: v for k, v in model.items() if k.removeprefix("model.") not in _EMBEDDED_ONLY}


def _rollout(cfg: Config) -> dict:
    """What decides how PPO's rollouts are sampled and weighed; the vLLM memory settings change
    how fast, not what. The engine as far as the config can say: `auto` is hf on CPUs, and on
    GPUs stays `auto` (each generator picks where it runs), so a change to it is one too."""
    engine = cfg.rollout_engine
    rollout = {
        "rollout.engine": engine,  # hf and vLLM are other samplers of the same policy
        **{f"rollout.{k}": getattr(cfg.rollout, k) for k in ("logprob_correction", "tis_cap")},
        "rollout.logprob_source": cfg.logprob_source,  # resolved: the ratio's old logprobs
    }
    if engine != "hf":  # how vLLM holds the base: e.g. fp8 weights give other logits
        rollout["rollout.vllm_quantization"] = cfg.rollout.vllm_quantization
    return rollout


def phase_settings(cfg: Config, data_dir: Path) -> dict[str, dict]:
    """Phase ("sft", "reward", "ppo") -> {"section.key": value} its result depends on."""
    shared = {
        **_model(cfg),
        **_section(cfg, "quantization"),
        **{f"data.{k}": getattr(cfg.data, k) for k in _DATA_LIMITS},
        "data.chat_template": chat.read_template(cfg.data.chat_template),  # the text, not a path
        "run.seed": cfg.run.seed,
    }
    lora = _section(cfg, "lora")
    # The worker count sets the rows per step. Not resources.train_sharding: DDP and FSDP2 take
    # the same step, their sums in another order (tests/test_train_workers.py), and their epoch
    # checkpoints are alike, so a stopped phase may continue under the other.
    workers = {"resources.train_workers": cfg.resources.train_workers}
    sft = {
        **shared,
        **_section(cfg, "sft"),
        **(lora if cfg.sft.method == "lora" else {}),
        **workers,
        "data.sft_rows_sha256": _rows_digest(data_dir, "sft"),
    }
    reward = {
        **sft,
        **_section(cfg, "reward"),
        **(lora if cfg.reward.method == "lora" else {}),
        "data.preference_rows_sha256": _rows_digest(data_dir, "preferences"),
    }
    ppo = {
        **(reward if cfg.scoring.uses_reward_model else sft),
        **_section(cfg, "ppo"),
        **_section(cfg, "scoring"),
        **lora,  # the policy always trains a LoRA adapter
        **_rollout(cfg),
        # the learner's torch threads (learner_cpus when 0): they split its reductions (losses,
        # whitening, gradient norms) into other partial sums, so the floats it learns differ
        "resources.learner_threads": cfg.resources.learner_torch_threads,
        "data.prompt_rows_sha256": _rows_digest(data_dir, "prompts"),
    }
    return {"sft": sft, "reward": reward, "ppo": ppo}


def record_path(output_dir: Path, phase: str) -> Path:
    return output_dir / SETTINGS_DIR / f"{phase}.json"


def read_record(output_dir: Path, phase: str) -> dict | None:
    path = record_path(output_dir, phase)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{path}: the record of the settings this phase was run with cannot be read "
            f"({err}); use a new run.output_dir, or --run.redo {phase}"
        ) from err


def write_record(output_dir: Path, phase: str, settings: dict) -> None:
    path = record_path(output_dir, phase)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


@functools.cache
def _defaults() -> dict:
    """{"section.key": default value} of every setting, as a record would hold it."""
    sections = json.loads(json.dumps(dataclasses.asdict(Config())))
    return {f"{name}.{k}": v for name, values in sections.items() for k, v in values.items()}


def _differs(key: str, recorded: dict, current: dict) -> bool:
    """A setting the record lacks was added to rlhf-ray after the phase ran: the run was made
    with its default behaviour, so only a value other than the default is a change."""
    if key not in recorded and key in current and key in _defaults():
        return current[key] != _defaults()[key]
    return recorded.get(key, "(unset)") != current.get(key, "(unset)")


def check_against_record(output_dir: Path, phase: str, settings: dict, redo: str) -> None:
    """Raise ConfigError naming every setting that differs from the phase's record, if any.

    `redo`: the phase to name in the advice (the earliest one whose outputs must go).
    """
    recorded = read_record(output_dir, phase)
    if recorded is None:
        return
    # JSON turned tuples into lists; compare what the record would hold now.
    current = json.loads(json.dumps(settings))
    keys = sorted(set(recorded) | set(current))
    changed = [k for k in keys if _differs(k, recorded, current)]
    if changed:
        lines = "\n".join(
            f"  {k}: {recorded.get(k, '(unset)')!r} then, {current.get(k, '(unset)')!r} now"
            for k in changed
        )
        raise ConfigError(
            f"{output_dir}: its {phase} outputs were made with other settings than this run's:\n"
            f"{lines}\nUse a new run.output_dir, or add --run.redo {redo} to delete the {redo} "
            "phase's outputs and everything after it and train them again."
        )
