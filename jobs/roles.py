"""The four PPO roles as named Ray actors, each with the resources its config asks for."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import ray

from actors.ppo_learner import PPOLearner
from actors.reference_model import ReferenceModel
from actors.reward_scorer import RewardScorer
from actors.rollout_generator import RolloutGenerator
from jobs.waiting import capacity_watch, get_results
from rlhf_ray.config import Config
from rlhf_ray.data.prepare import limits_of
from rlhf_ray.models.loading import FrozenModelSettings
from rlhf_ray.ppo.learner import LearnerSettings
from rlhf_ray.ppo.reward_scorer import ScorerSettings
from rlhf_ray.ppo.rollout_generator import PolicySettings
from rlhf_ray.run.checkpoints import phase_dir
from rlhf_ray.run.resources import actor_options

# Actor names, as the Ray dashboard and the roles/<name>_busy metrics show them.
LEARNER, SCORER, REFERENCE = "learner", "reward", "reference"


def generator_name(rank: int) -> str:
    return f"rollout-{rank}"


@dataclass
class Roles:
    learner: ray.actor.ActorHandle
    scorer: ray.actor.ActorHandle
    reference: ray.actor.ActorHandle
    generators: list[ray.actor.ActorHandle]

    def all(self) -> list:
        return [self.learner, self.scorer, self.reference, *self.generators]

    def names(self) -> list[str]:
        """The actor names of `all()`, in its order, as the dashboard shows them."""
        return [
            LEARNER,
            SCORER,
            REFERENCE,
            *(generator_name(r) for r in range(len(self.generators))),
        ]


def create_roles(cfg: Config, out: Path) -> Roles:
    """The four roles, named for the dashboard, each with the resources its config asks for."""
    res, timeout = cfg.resources, cfg.run.ray_timeout_s
    sft_dir, reward_dir = str(phase_dir(out, "sft")), str(phase_dir(out, "reward"))
    policy = PolicySettings(
        sft_dir,
        cfg.model,
        cfg.quantization,
        cfg.lora,
        limits_of(cfg.data),
        cfg.ppo.temperature,
        res.learner_cpus,
        res.learner_gpus,
        cfg.run.seed,
    )
    critic_path = reward_dir if cfg.scoring.uses_reward_model else sft_dir
    learner_settings = LearnerSettings(policy, critic_path, cfg.reward.method, cfg.ppo)
    learner = PPOLearner.options(
        name=LEARNER, **actor_options(res.learner_cpus, res.learner_gpus)
    ).remote(learner_settings, timeout)

    def frozen(path: str, cpus: float, gpus: float) -> FrozenModelSettings:
        return FrozenModelSettings(path, cfg.model, cfg.quantization, cpus, gpus)

    # The stateless roles come back on their own after a crash, and Ray retries the call that
    # was running; the learner holds the training state and is not restarted this way.
    restarts = {
        "max_restarts": cfg.ppo.max_role_restarts,
        "max_task_retries": cfg.ppo.max_role_restarts,
    }
    scoring = cfg.scoring
    scorer_settings = ScorerSettings(
        frozen(reward_dir, res.reward_cpus, res.reward_gpus) if scoring.uses_reward_model else None,
        scoring.reward_model_weight,
        scoring.functions,
        scoring.weights,
        sft_dir,
        cfg.model.trust_remote_code,
    )
    scorer = RewardScorer.options(
        name=SCORER, **restarts, **actor_options(res.reward_cpus, res.reward_gpus)
    ).remote(scorer_settings)
    reference = ReferenceModel.options(
        name=REFERENCE, **restarts, **actor_options(res.reference_cpus, res.reference_gpus)
    ).remote(frozen(sft_dir, res.reference_cpus, res.reference_gpus), cfg.ppo.temperature)
    generator_settings = replace(policy, cpus=res.rollout_cpus, gpus=res.rollout_gpus)
    generators = [
        RolloutGenerator.options(
            name=generator_name(rank),
            **restarts,
            **actor_options(res.rollout_cpus, res.rollout_gpus),
        ).remote(generator_settings, rank, learner, timeout)
        for rank in range(cfg.ppo.num_rollout_actors)
    ]
    roles = Roles(learner, scorer, reference, generators)
    refs = [a.ready.remote() for a in roles.all()]
    get_results(refs, timeout, "starting the PPO actors", watch=capacity_watch(cfg))
    return roles
