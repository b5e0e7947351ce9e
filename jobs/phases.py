"""The steps `jobs/rlhf.py` runs, each a short function over Ray and the Ray-free library."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ray

from jobs import cluster
from rlhf_ray.config import PHASES, Config, DataConfig
from rlhf_ray.config.loading import config_to_yaml
from rlhf_ray.config.rollout import check_engine_installed
from rlhf_ray.data.prepare import PreparedRun, limits_of, read_rows
from rlhf_ray.errors import ConfigError, ResourceError
from rlhf_ray.models.loading import FrozenModelSettings, check_embedded_fits
from rlhf_ray.models.source import check_model_dir, check_model_source
from rlhf_ray.models.target_modules import check_target_modules
from rlhf_ray.ppo.reward_functions import import_reward_function
from rlhf_ray.ppo.settings import engine_quantization
from rlhf_ray.run import evaluation, fingerprints, judges, trackers
from rlhf_ray.run.best_step import BEST_DIR, LAST_DIR
from rlhf_ray.run.checkpoints import METRICS_FILE, is_complete, phase_dir
from rlhf_ray.run.ppo_checkpoints import checkpoints_root, complete_steps
from rlhf_ray.run.resources import (
    PhaseResources,
    RoleRequest,
    actor_options,
    bundle,
    ppo_groups,
    ppo_requests,
    training_groups,
    training_requests,
)
from rlhf_ray.train.launch import launch, reward_loop, sft_loop, train_storage
from rlhf_ray.train.settings import RewardWorkerSettings, SFTWorkerSettings


def phase_inputs(cfg: Config, phase: str) -> tuple[str, ...]:
    """The phases whose outputs `phase` reads: PPO needs the reward model only if it uses one."""
    if phase == "ppo":
        return ("sft", "reward") if cfg.scoring.uses_reward_model else ("sft",)
    return {"sft": (), "reward": ("sft",)}[phase]


def unused_phases(cfg: Config) -> dict[str, str]:
    """Phases in run.phases that nothing in this run would use -> why they are skipped."""
    if "reward" not in cfg.run.phases or cfg.scoring.uses_reward_model:
        return {}
    why = "scoring.reward_model_weight is 0, so PPO scores with reward functions only"
    if cfg.data.preference_path:
        why += f"; data.preference_path ({cfg.data.preference_path}) is not used"
    return {"reward": why}


def unused_settings(cfg: Config) -> list[str]:
    """`section.key=value` of settings changed from their defaults that this run has no use
    for, so the run names them instead of dropping them silently."""
    if "ppo" not in cfg.run.phases:
        return []
    unused = cfg.ppo.unused_settings() + cfg.rollout.unused_settings(cfg.rollout_engine)
    if not cfg.scoring.uses_reward_model and cfg.resources.reward_gpus > 0:
        unused.append(f"resources.reward_gpus={cfg.resources.reward_gpus} (no reward model)")
    return unused


def check_phase_inputs(cfg: Config, out: Path) -> None:
    """The base model, every selected phase's inputs (which exist already or are made earlier
    in this run), and the reward functions PPO will call, its rollout engine and the trackers
    named can be loaded or imported."""
    trackers.check_trackers(cfg.run.report_to)
    check_base_model(cfg)
    if "ppo" in cfg.run.phases:
        check_engine_installed(cfg.rollout_engine)
        if cfg.rollout_engine == "vllm":
            say_how_vllm_holds_the_base(cfg)
        if cfg.rollout_engine == "auto" and cfg.vllm_misfit():
            print(f"[ppo] rollout.engine auto: the generators use hf: {cfg.vllm_misfit()}")
        for spec in cfg.scoring.functions:
            import_reward_function(spec)
    if cfg.run.evaluate:
        judges.check_judges(judges.judges_of(cfg)[0])
    for phase in cfg.run.phases:
        if phase not in unused_phases(cfg):
            check_phase_dir_is_ours(out, phase)
        for needed in phase_inputs(cfg, phase):
            if needed in cfg.run.phases:
                continue
            if not is_complete(phase_dir(out, needed)):
                raise ConfigError(
                    f"run.phases={','.join(cfg.run.phases)}: the {phase} phase needs a complete "
                    f"{phase_dir(out, needed)}/ from an earlier run, and there is none; "
                    f"add {needed} to --phases"
                )
            where = f"{phase_dir(out, needed)} (the {needed} phase of an earlier run)"
            check_model_dir(phase_dir(out, needed), cfg.model.trust_remote_code, where)


def check_phase_dir_is_ours(out: Path, phase: str) -> None:
    """A phase's folder that exists is its complete output, skipped; anything else there (a
    user's own folder, a file) is refused before work, not found once the phase has trained
    and cannot write its model."""
    folder = phase_dir(out, phase)
    if folder.exists() and not is_complete(folder):
        raise ConfigError(
            f"run.output_dir: {folder} exists but is no complete output of the {phase} phase "
            f"(it has no {METRICS_FILE}); the {phase} phase writes its model there, so move "
            "it elsewhere or choose another run.output_dir"
        )


def check_base_model(cfg: Config) -> None:
    """The model SFT starts from can be loaded (the embedded one fits in memory), and
    `lora.target_modules` name modules of it
    when a phase of this run builds an adapter (PPO always does; SFT and the reward model with
    `method: lora`), all before anything is written (the embedded model's skeleton is built
    from its settings)."""
    if cfg.model.is_embedded:
        check_embedded_fits(cfg.model)
    else:
        check_model_source(
            cfg.model.name_or_path, cfg.model.trust_remote_code, "model.name_or_path"
        )
    trains_lora = "ppo" in cfg.run.phases or any(
        phase.section in cfg.run.phases and phase.method == "lora"
        for phase in (cfg.sft, cfg.reward)
    )
    if trains_lora:
        check_target_modules(cfg.lora, cfg.model)


def say_how_vllm_holds_the_base(cfg: Config) -> None:
    """Checks `rollout.vllm_quantization` against the vLLM installed, and says when a 4-bit
    policy's base is served otherwise (vLLM 0.32 dropped bitsandbytes)."""
    quantization = engine_quantization(cfg.rollout, cfg.quantization.load_in_4bit)
    if cfg.quantization.load_in_4bit and quantization != "bitsandbytes":
        held = quantization or cfg.quantization.compute_dtype
        print(
            f"[ppo] the vLLM rollout engine holds the base model in {held}, the learner in 4-bit "
            "(this vLLM has no bitsandbytes loading): rollout/logprob_gap_* shows how far apart "
            "their logprobs are; rollout.logprob_correction tis corrects for it"
        )


def phases_to_redo(cfg: Config) -> tuple[str, ...]:
    """`run.redo` and every phase after it; () without it."""
    return PHASES[PHASES.index(cfg.run.redo) :] if cfg.run.redo else ()


def redo_phases(cfg: Config, out: Path) -> None:
    """`run.redo`: delete that phase's outputs and every later phase's, once every input is
    checked, right before the phases run. (Redoing SFT rebuilds the embedded base model in
    `prepare_run`.)"""
    doomed = []
    for phase in phases_to_redo(cfg):
        doomed += [phase_dir(out, phase), out / "tb" / phase, fingerprints.record_path(out, phase)]
        doomed.append(trackers.metrics_log(out, phase))
        doomed += [train_storage(out, phase)] if phase != "ppo" else [checkpoints_root(out)]
        doomed += [out / LAST_DIR, out / BEST_DIR] if phase == "ppo" else []
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        print(f"[redo] deleted {path}")


def check_recorded_settings(
    out: Path, current: dict[str, dict], redone: tuple[str, ...] = ()
) -> None:
    """Every phase that left outputs in `out` was run with `current` settings (exit 2 if not);
    `current` is `fingerprints.phase_settings` of this run; `redone` phases' outputs are about
    to be deleted and are not compared."""
    for phase in (p for p in PHASES if p not in redone):
        if fingerprints.read_record(out, phase) is None and _has_outputs(out, phase):
            raise ConfigError(
                f"{out}: it holds {phase} outputs but no record of the settings they were made "
                f"with ({fingerprints.record_path(out, phase)}; an older rlhf-ray made them). "
                f"Use a new run.output_dir, or --run.redo {phase}"
            )
        fingerprints.check_against_record(out, phase, current[phase], redo=phase)


def _has_outputs(out: Path, phase: str) -> bool:
    if is_complete(phase_dir(out, phase)):
        return True
    if phase == "ppo":
        return bool(complete_steps(checkpoints_root(out)))
    return train_storage(out, phase).exists()


def print_data_report(cfg: Config, report: dict) -> None:
    for name, info in report.items():
        line = f"[data] {name}: {info['rows']} {info['format']} rows from {info['source']}"
        if info.get("overlong"):
            verb = "truncated" if info["overlong_action"] == "truncate" else "rejected"
            line += f"; {info['overlong']} over the token limits, {verb}"
        if info.get("ignored_fields"):
            line += f"; ignored fields {info['ignored_fields']}"
        if info.get("repeated_rows"):
            line += f"; {info['repeated_rows']} repeat an earlier row exactly (kept)"
        print(line)
    conversational = any(info["format"] != "text" for info in report.values())
    if conversational and cfg.data.prompt_template != DataConfig.prompt_template:
        print("[data] data.prompt_template is not used: message lists go through the chat template")


def warn_of_trained_eval_prompts(data_dir: Path) -> None:
    """Held-out prompts that are also training prompts measure memory, not generalisation:
    said before the run, naming how many, so a user can split their files."""
    trained = {
        _prompt_key(row)
        for name in ("sft", "preferences", "prompts")
        for row in read_rows(data_dir, name)
    }
    held_out = [row for row in read_rows(data_dir, "eval_prompts") if _prompt_key(row) in trained]
    if held_out:
        print(
            f"[data] warning: {len(held_out)} of the held-out eval prompts are also training "
            f"prompts (the first: {held_out[0]['prompt']!r}); the evaluation of those measures "
            "what was trained on, not held-out performance"
        )


def _prompt_key(row: dict) -> str:
    """A prompt as a hashable key (a message list as JSON)."""
    return json.dumps(row["prompt"], sort_keys=True)


def resource_checks(cfg: Config) -> list[PhaseResources]:
    """Each set of roles that run at the same time, named for the error message, with the
    groups in which Ray places them (the evaluator is one bundle: no group to pack)."""
    res = cfg.resources
    checks = []
    if {"sft", "reward"} & set(cfg.run.phases):
        what = "the SFT and reward phases"
        checks.append(PhaseResources(what, training_requests(res), training_groups(res)))
    if "ppo" in cfg.run.phases:
        generators = cfg.ppo.num_rollout_actors
        requests, groups = ppo_requests(res, generators), ppo_groups(res, generators)
        checks.append(PhaseResources("the PPO phase", requests, groups))
    if cfg.run.evaluate:
        evaluator = RoleRequest("evaluator", 1, bundle(res.rollout_cpus, res.rollout_gpus))
        checks.append(PhaseResources("the evaluation", [evaluator], []))
    return checks


def check_resources(cfg: Config, nodes: list[dict[str, float]]) -> None:
    """ResourceError (exit 2) when `nodes` can never hold what a phase asks at one time, or
    the learner's threads; checked against the local Ray before it starts, the message says
    what that Ray would have."""
    try:
        for phase in resource_checks(cfg):
            cluster.check_resources(phase, nodes)
        if "ppo" in cfg.run.phases:
            cluster.check_threads(cfg.resources, nodes)
    except ResourceError as err:
        if ray.is_initialized():
            raise
        raise ResourceError(
            f"{err}. The local Ray this run starts has {cluster.describe_local_node(cfg.run)}; "
            "to run on a cluster, set RAY_ADDRESS or use `ray job submit` (docs/cluster.md)"
        ) from None


def save_resolved_config(cfg: Config, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")


def sft_worker_settings(cfg: Config, prepared: PreparedRun) -> SFTWorkerSettings:
    out = Path(cfg.run.output_dir).resolve()
    return SFTWorkerSettings(
        base_path=_abs_if_local(prepared.base_path),
        data_dir=prepared.data_dir.resolve(),
        out_dir=phase_dir(out, "sft"),
        tracking=trackers.tracking_of(cfg),
        model=cfg.model,
        quantization=cfg.quantization,
        lora=cfg.lora,
        sft=cfg.sft,
        limits=limits_of(cfg.data),
        worker_cpus=cfg.resources.train_worker_cpus,
        sharding=cfg.resources.train_sharding,
        seed=cfg.run.seed,
    )


def reward_worker_settings(cfg: Config, prepared: PreparedRun) -> RewardWorkerSettings:
    out = Path(cfg.run.output_dir).resolve()
    return RewardWorkerSettings(
        sft_path=str(phase_dir(out, "sft")),
        data_dir=prepared.data_dir.resolve(),
        out_dir=phase_dir(out, "reward"),
        tracking=trackers.tracking_of(cfg),
        model=cfg.model,
        quantization=cfg.quantization,
        lora=cfg.lora,
        reward=cfg.reward,
        limits=limits_of(cfg.data),
        worker_cpus=cfg.resources.train_worker_cpus,
        sharding=cfg.resources.train_sharding,
        seed=cfg.run.seed,
    )


def train_sft(cfg: Config, prepared: PreparedRun) -> None:
    settings = {"settings": sft_worker_settings(cfg, prepared)}
    launch("sft", sft_loop, settings, cfg.resources, Path(cfg.run.output_dir))


def train_reward(cfg: Config, prepared: PreparedRun) -> None:
    settings = {"settings": reward_worker_settings(cfg, prepared)}
    launch("reward", reward_loop, settings, cfg.resources, Path(cfg.run.output_dir))


def train_ppo(cfg: Config, prepared: PreparedRun) -> None:
    from jobs.ppo.run import run_ppo

    run_ppo(cfg, prepared)


def evaluate(cfg: Config, prepared: PreparedRun) -> dict:
    """Sample every existing model on the held-out prompts, in parallel Ray tasks."""
    out = Path(cfg.run.output_dir).resolve()
    models = {"base": _abs_if_local(prepared.base_path)}
    for name, phase in (("sft", "sft"), ("policy", "ppo")):
        if is_complete(phase_dir(out, phase)):
            models[name] = str(phase_dir(out, phase))
    prompts = [r["prompt"] for r in read_rows(prepared.data_dir, "eval_prompts")]
    res = cfg.resources
    task = ray.remote(evaluation.generate_eval_responses).options(
        **actor_options(res.rollout_cpus, res.rollout_gpus), name="evaluate"
    )

    def frozen(path: str) -> FrozenModelSettings:
        return FrozenModelSettings(
            path, cfg.model, cfg.quantization, res.rollout_cpus, res.rollout_gpus
        )

    def settings(name: str, path: str) -> evaluation.EvalSettings:
        # the policy's KL to PPO's reference, the SFT model, over every held-out sample
        reference = frozen(str(phase_dir(out, "sft"))) if name == "policy" else None
        return evaluation.EvalSettings(
            frozen(path), cfg.eval, limits_of(cfg.data), cfg.run.seed, reference
        )

    refs = {name: task.remote(settings(name, path), prompts) for name, path in models.items()}
    sampled = {name: ray.get(ref, timeout=cfg.run.ray_timeout_s) for name, ref in refs.items()}
    responses = {name: result.texts for name, result in sampled.items()}
    judged = judge_samples(cfg, out, prompts, responses)
    responses["ideal"] = evaluation.ideal_responses(prompts)
    policy_kl = {"policy_kl": sampled["policy"].kl} if "policy" in sampled else {}
    evaluation.write_samples(out / "eval_samples.jsonl", prompts, responses | policy_kl)
    return {
        "prompts": prompts,
        "responses": responses,
        "data_dir": prepared.data_dir,
        "judged": judged,
        **policy_kl,
    }


def judge_samples(cfg: Config, out: Path, prompts: list, responses: dict) -> dict:
    """The held-out samples scored by eval.judges (the reward model, reward functions), in a
    Ray task with the reward scorer's resources: judge -> model -> [prompt][sample] scores."""
    names, note = judges.judges_of(cfg, phase_dir(out, "reward"))
    if note:
        print(f"[eval] {note}", flush=True)
    if not names or not is_complete(phase_dir(out, "sft")):
        return {}
    res = cfg.resources
    reward_model = None
    if judges.REWARD_MODEL in names:
        reward_model = FrozenModelSettings(
            str(phase_dir(out, "reward")),
            cfg.model,
            cfg.quantization,
            res.reward_cpus,
            res.reward_gpus,
        )
    settings = judges.JudgeSettings(
        names,
        reward_model,
        str(phase_dir(out, "sft")),
        cfg.model.trust_remote_code,
        limits_of(cfg.data),
        cfg.eval.batch_size,
    )
    task = ray.remote(judges.judge_responses).options(
        **actor_options(res.reward_cpus, res.reward_gpus), name="judge"
    )
    judged = {name: responses[name] for name in judges.MODELS if name in responses}
    return ray.get(task.remote(settings, prompts, judged), timeout=cfg.run.ray_timeout_s)


def _abs_if_local(path: str) -> str:
    """Model paths that exist locally become absolute (workers run in other directories)."""
    p = Path(path)
    return str(p.resolve()) if p.exists() else path
