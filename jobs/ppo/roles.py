"""The four PPO roles as named Ray actors, each with the resources its config asks for."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from actors.reference_model import ReferenceModel
from actors.reward_scorer import RewardScorer
from actors.rollout_generator import RolloutGenerator
from actors.weights_board import BOARD_PREFIX, WeightsBoard
from jobs.ppo.learner_group import LearnerGroup, in_bundle
from jobs.ppo.waiting import capacity_watch, get_results
from rlhf_ray.config import Config
from rlhf_ray.data.chat import prompt_text
from rlhf_ray.data.jsonl import read_jsonl
from rlhf_ray.data.prepare import limits_of
from rlhf_ray.models.loading import FrozenModelSettings
from rlhf_ray.ppo.settings import (
    EngineSettings,
    LearnerSettings,
    PolicySettings,
    ScorerSettings,
)
from rlhf_ray.run.checkpoints import phase_dir
from rlhf_ray.run.resources import actor_options, bundle
from rlhf_ray.world.gold_judge import GoldJudge

# Actor names, as the Ray dashboard and the roles/<name>_busy metrics show them (the learner's
# ranks: learner_group.learner_names).
SCORER, REFERENCE = "reward", "reference"


def generator_name(rank: int) -> str:
    return f"rollout-{rank}"


@dataclass
class Roles:
    learner: LearnerGroup
    scorer: ray.actor.ActorHandle
    reference: ray.actor.ActorHandle
    generators: dict[int, ray.actor.ActorHandle]  # rank -> generator, by rank
    cfg: Config
    out: Path
    next_rank: int = 0  # above every generator rank this run has used, also before a resume
    placement: PlacementGroup | None = None  # the scorer's and the reference's
    # partial rollouts (rollout.partial_chunk_tokens with vLLM): where the driver posts each
    # update's weights for the generators to take between chunks
    board: ray.actor.ActorHandle | None = None

    def all(self) -> list:
        """Every role's actor: each learner rank, the scorer, the reference, each generator."""
        return [*self.learner.ranks, self.scorer, self.reference, *self.generators.values()]

    def names(self) -> list[str]:
        """The actor names of `all()`, in its order, as the dashboard shows them."""
        return [*self.learner.names, SCORER, REFERENCE, *map(generator_name, self.generators)]

    def stop(self) -> None:
        """Every role's process, and the learner's placement group."""
        for actor in [self.scorer, self.reference, *self.generators.values()]:
            ray.kill(actor, no_restart=True)
        if self.board is not None:
            ray.kill(self.board, no_restart=True)
        self.learner.stop()
        if self.placement is not None:
            remove_placement_group(self.placement)

    def board_name(self) -> str | None:
        return BOARD_PREFIX + str(self.out) if self.board is not None else None

    def start_generators(self, ranks: list[int]) -> dict[int, ray.actor.ActorHandle]:
        """New generators (not yet waited for, except vLLM engines that share a GPU: each
        measures the GPU's free memory as it starts, so they start one after another); each
        loads the learner's current weights in its constructor, before it can sample."""
        res = self.cfg.resources
        settings = replace(
            policy_settings(self.cfg, self.out), cpus=res.rollout_cpus, gpus=res.rollout_gpus
        )
        timeout = self.cfg.run.ray_timeout_s
        engine = engine_settings(self.cfg)
        one_by_one = engine is not None and 0 < res.rollout_gpus < 1
        started = {}
        for rank in ranks:
            started[rank] = RolloutGenerator.options(
                name=generator_name(rank),
                **generator_restarts(self.cfg),
                **actor_options(res.rollout_cpus, res.rollout_gpus),
            ).remote(settings, engine, rank, self.learner.chief_name, timeout, self.board_name())
            if one_by_one:
                get_results(
                    started[rank].ready.remote(), timeout, f"starting {generator_name(rank)}"
                )
        self.generators = dict(sorted({**self.generators, **started}.items()))
        self.next_rank = max([self.next_rank, *(rank + 1 for rank in ranks)])
        return started


def policy_settings(cfg: Config, out: Path) -> PolicySettings:
    """The policy as the learner builds it (generators take their own rollout resources)."""
    res = cfg.resources
    return PolicySettings(
        str(phase_dir(out, "sft")),
        cfg.model,
        cfg.quantization,
        cfg.lora,
        limits_of(cfg.data),
        cfg.ppo.temperature,
        res.learner_torch_threads,
        res.learner_gpus,
        cfg.run.seed,
    )


def learner_settings(cfg: Config, out: Path) -> LearnerSettings:
    """The policy, and the critic: from the reward model, or without one from the SFT model."""
    critic_from = "reward" if cfg.scoring.uses_reward_model else "sft"
    return LearnerSettings(
        policy_settings(cfg, out),
        str(phase_dir(out, critic_from)),
        cfg.reward.method,
        cfg.ppo,
        logprob_source=cfg.logprob_source,
        rollout=cfg.rollout,
        critic_sharding=cfg.resources.learner_sharding,
    )


def engine_settings(cfg: Config) -> EngineSettings | None:
    """The vLLM engine's settings where a generator may sample with vLLM (rollout.engine vllm,
    or auto on GPUs with a config vLLM fits); None: Hugging Face generate."""
    engine = cfg.rollout_engine
    if engine == "hf" or (engine == "auto" and cfg.vllm_misfit()):
        return None
    rollout_len = cfg.data.max_prompt_tokens + cfg.data.max_completion_tokens
    return EngineSettings(cfg.rollout, rollout_len, auto=engine == "auto")


def role_restarts(cfg: Config) -> dict:
    """The stateless roles come back on their own after a crash, and Ray retries the call that
    was running; the learner holds the training state and is not restarted this way."""
    return {
        "max_restarts": cfg.ppo.max_role_restarts,
        "max_task_retries": cfg.ppo.max_role_restarts,
    }


def generator_restarts(cfg: Config) -> dict:
    """With auto scaling a generator that dies is not restarted in place: the driver drops it,
    gives its rows to the others and starts new ones where the live nodes have room."""
    return {"max_restarts": 0} if cfg.ppo.autoscales else role_restarts(cfg)


def judge_knows_every_prompt(prompts_file: Path) -> bool:
    """Whether the gold judge can watch PPO: it knows every prompt (the synthetic world's)."""
    if not prompts_file.is_file():
        return False
    judge = GoldJudge()
    return all(judge.knows(prompt_text(row["prompt"])) for row in read_jsonl(prompts_file))


def packed(bundles: list[dict]) -> PlacementGroup | None:
    """The scorer and the reference as one PACK placement group, placed by Ray together: placed
    one by one, they can take the halves of two nodes a generator needed (seen with two 1-CPU
    nodes and two learner ranks spread over them: a 0.5-CPU generator fitted nowhere). Ray
    refuses a bundle of nothing: None when both ask for nothing, and one that does alone gets
    Ray's smallest unit of a CPU in the group."""
    if not any(v for b in bundles for v in b.values()):
        return None
    return placement_group([b if any(b.values()) else {"CPU": 0.0001} for b in bundles], "PACK")


def create_roles(cfg: Config, out: Path, ranks: list[int] | None = None) -> Roles:
    """The four roles, named for the dashboard, each with the resources its config asks for;
    generators of `ranks` (default: 0 .. ppo.num_rollout_actors - 1)."""
    res, timeout = cfg.resources, cfg.run.ray_timeout_s
    sft_dir, reward_dir = str(phase_dir(out, "sft")), str(phase_dir(out, "reward"))
    learner = LearnerGroup(cfg, learner_settings(cfg, out))

    def frozen(path: str, cpus: float, gpus: float) -> FrozenModelSettings:
        return FrozenModelSettings(path, cfg.model, cfg.quantization, cpus, gpus)

    scoring = cfg.scoring
    scorer_settings = ScorerSettings(
        frozen(reward_dir, res.reward_cpus, res.reward_gpus) if scoring.uses_reward_model else None,
        scoring.reward_model_weight,
        scoring.functions,
        scoring.weights,
        sft_dir,
        cfg.model.trust_remote_code,
        watch_gold=judge_knows_every_prompt(out / "data" / "prompts.jsonl"),
    )
    frozen_bundles = [bundle(res.reward_cpus, res.reward_gpus)]
    frozen_bundles.append(bundle(res.reference_cpus, res.reference_gpus))
    together = packed(frozen_bundles)
    scorer = RewardScorer.options(
        name=SCORER,
        **role_restarts(cfg),
        **actor_options(res.reward_cpus, res.reward_gpus),
        **in_bundle(together, 0),
    ).remote(scorer_settings)
    reference = ReferenceModel.options(
        name=REFERENCE,
        **role_restarts(cfg),
        **actor_options(res.reference_cpus, res.reference_gpus),
        **in_bundle(together, 1),
    ).remote(frozen(sft_dir, res.reference_cpus, res.reference_gpus), cfg.ppo.temperature)
    roles = Roles(learner, scorer, reference, {}, cfg, out, placement=together)
    if cfg.rollout.partial_chunk_tokens and engine_settings(cfg) is not None:
        roles.board = WeightsBoard.options(name=BOARD_PREFIX + str(out)).remote()
    try:
        roles.start_generators(list(range(cfg.ppo.num_rollout_actors)) if ranks is None else ranks)
        refs = [a.ready.remote() for a in roles.all()]
        watch = capacity_watch(cfg, len(roles.generators))
        get_results(refs, timeout, "starting the PPO actors", watch=watch)
        learner.connect(watch)
    except BaseException:
        roles.stop()  # nothing is left holding resources (the learner's placement group)
        raise
    if cfg.rollout_engine == "auto":
        record_engine_choices(roles)
    return roles


def record_engine_choices(roles: Roles) -> dict[str, str]:
    """What rollout.engine auto chose on each generator's node, said and kept in
    `<output_dir>/rollout_engines.json` (name -> "vllm", or "hf (why not vLLM)")."""
    refs = [g.engine_choice.remote() for g in roles.generators.values()]
    answers = get_results(refs, roles.cfg.run.ray_timeout_s, "asking the generators' engines")
    names = map(generator_name, roles.generators)
    chosen = {
        name: engine if why_not is None else f"{engine} ({why_not})"
        for name, (engine, why_not) in zip(names, answers, strict=True)
    }
    print("[ppo] rollout.engine auto: " + "; ".join(f"{n} {e}" for n, e in chosen.items()))
    path = roles.out / "rollout_engines.json"
    path.write_text(json.dumps(chosen, indent=1) + "\n", encoding="utf-8")
    return chosen
