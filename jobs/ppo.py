"""Phase 3, PPO as Ray actors. The driver holds ObjectRefs and scalar statistics only.

One iteration is five named, timed stages:
  generate   every RolloutGenerator samples its shard of prompts  -> RolloutBatch refs
  score      RewardScorer.score(batch ref)                        -> scores refs      } in
  reference  ReferenceModel.logprobs(batch ref)                   -> logprobs refs    } parallel
  learn      PPOLearner.train(all refs)                           -> scalar stats
  sync       PPOLearner.weights() put once, loaded by every generator
With `ppo.overlap` the next batch is generated while the learner updates (one version behind).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError
from tqdm import tqdm

from actors.ppo_learner import PPOLearner
from actors.reference_model import ReferenceModel
from actors.reward_scorer import RewardScorer
from actors.rollout_generator import RolloutGenerator
from rlhf_ray.config import Config
from rlhf_ray.data.prepare import PreparedRun, limits_of, read_rows
from rlhf_ray.models.loading import FrozenModelSettings
from rlhf_ray.ppo.learner import LearnerSettings
from rlhf_ray.ppo.rollout_generator import PolicySettings
from rlhf_ray.run import metrics
from rlhf_ray.run.checkpoints import phase_dir
from rlhf_ray.run.resources import actor_options


@dataclass
class Roles:
    learner: ray.actor.ActorHandle
    scorer: ray.actor.ActorHandle
    reference: ray.actor.ActorHandle
    generators: list[ray.actor.ActorHandle]

    def all(self) -> list:
        return [self.learner, self.scorer, self.reference, *self.generators]


def run_ppo(cfg: Config, prepared: PreparedRun) -> None:
    out = Path(cfg.run.output_dir).resolve()
    roles = create_roles(cfg, out)
    try:
        prompts = PromptStream(
            [r["prompt"] for r in read_rows(prepared.data_dir, "prompts")], cfg.run.seed
        )
        totals = PPOLoop(cfg, roles, prompts, metrics.MetricWriter(out / "tb")).run()
        _get(
            roles.learner.export.remote(str(phase_dir(out, "ppo")), totals),
            cfg.run.ray_timeout_s,
            "exporting the policy",
        )
    finally:
        for actor in roles.all():
            ray.kill(actor, no_restart=True)


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
    learner_settings = LearnerSettings(policy, reward_dir, cfg.reward.method, cfg.ppo)
    learner = PPOLearner.options(
        name="learner", **actor_options(res.learner_cpus, res.learner_gpus)
    ).remote(learner_settings, timeout)

    def frozen(path: str, cpus: float, gpus: float) -> FrozenModelSettings:
        return FrozenModelSettings(path, cfg.model, cfg.quantization, cpus, gpus)

    scorer = RewardScorer.options(
        name="reward", **actor_options(res.reward_cpus, res.reward_gpus)
    ).remote(frozen(reward_dir, res.reward_cpus, res.reward_gpus))
    reference = ReferenceModel.options(
        name="reference", **actor_options(res.reference_cpus, res.reference_gpus)
    ).remote(frozen(sft_dir, res.reference_cpus, res.reference_gpus), cfg.ppo.temperature)
    generator_settings = replace(policy, cpus=res.rollout_cpus, gpus=res.rollout_gpus)
    generators = [
        RolloutGenerator.options(
            name=f"rollout-{rank}",
            max_restarts=cfg.ppo.max_generator_restarts,
            max_task_retries=cfg.ppo.max_generator_restarts,
            **actor_options(res.rollout_cpus, res.rollout_gpus),
        ).remote(generator_settings, rank, learner, timeout)
        for rank in range(cfg.ppo.num_rollout_actors)
    ]
    roles = Roles(learner, scorer, reference, generators)
    _get([a.ready.remote() for a in roles.all()], timeout, "starting the PPO actors")
    return roles


@dataclass
class Pending:
    """A batch being generated: one RolloutBatch ref per generator, and when it was asked for."""

    refs: list
    dispatched_at: float


class PromptStream:
    """Prompts in a fresh seeded order each pass over the RL prompt set."""

    def __init__(self, prompts: list[str], seed: int) -> None:
        self.prompts, self.rng, self.queue = prompts, random.Random(seed), []

    def take(self, count: int) -> list[str]:
        while len(self.queue) < count:
            order = self.prompts[:]
            self.rng.shuffle(order)
            self.queue += order
        taken, self.queue = self.queue[:count], self.queue[count:]
        return taken


class PPOLoop:
    def __init__(self, cfg: Config, roles: Roles, prompts: PromptStream, writer) -> None:
        self.cfg, self.ppo = cfg, cfg.ppo
        self.roles, self.prompts, self.writer = roles, prompts, writer
        self.timeout = cfg.run.ray_timeout_s
        self.stage_totals = dict.fromkeys(metrics.STAGES, 0.0)

    def run(self) -> dict:
        bar = tqdm(total=self.ppo.steps, desc="ppo", disable=not self.cfg.run.progress_bar)
        pending, tokens, start, last = self._dispatch(), 0.0, time.perf_counter(), {}
        for step in range(1, self.ppo.steps + 1):
            step_start = time.perf_counter()
            pending, last, times = self._step(pending, more=step < self.ppo.steps)
            tokens += last.pop(metrics.BATCH_TOKENS)
            last[metrics.TOKENS_PER_S] = tokens / (time.perf_counter() - start)
            self.writer.scalars(
                {**last, **{metrics.stage_time(s): t for s, t in times.items()}}, step
            )
            bar.set_postfix(
                score=f"{last[metrics.SCORES]:.2f}",
                kl=f"{last[metrics.KL]:.2f}",
                step_s=f"{time.perf_counter() - step_start:.1f}",
            )
            bar.update(1)
        bar.close()
        self.writer.close()
        return {
            **last,
            "stage_seconds": {s: round(t, 2) for s, t in self.stage_totals.items()},
            "steps": self.ppo.steps,
            "seconds": round(time.perf_counter() - start, 1),
        }

    def _dispatch(self) -> Pending:
        """Start generation of the next batch, split evenly over the generators."""
        n = len(self.roles.generators)
        prompts = self.prompts.take(self.ppo.rollouts_per_step)
        shard = len(prompts) // n
        refs = [
            g.generate.remote(prompts[i * shard : (i + 1) * shard])
            for i, g in enumerate(self.roles.generators)
        ]
        return Pending(refs, time.perf_counter())

    def _step(self, pending: Pending, more: bool) -> tuple[Pending, dict, dict]:
        """One PPO iteration on `pending`; returns the next batch in flight, stats, stage times."""
        batch_refs = pending.refs
        times = {"generate": self._wait(batch_refs, "generate", pending.dispatched_at)}
        if self.ppo.overlap and more:
            pending = self._dispatch()
        t = time.perf_counter()  # scoring and reference run in parallel: both timed from here
        score_refs = [self.roles.scorer.score.remote(b) for b in batch_refs]
        ref_refs = [self.roles.reference.logprobs.remote(b) for b in batch_refs]
        times["score"] = self._wait(score_refs, "score", t)
        times["reference"] = self._wait(ref_refs, "reference", t)
        t = time.perf_counter()
        stats = _get(
            self.roles.learner.train.remote(
                list(zip(batch_refs, score_refs, ref_refs, strict=True))
            ),
            self.timeout,
            "the learner update",
        )
        times["learn"] = time.perf_counter() - t
        t = time.perf_counter()
        weights = self.roles.learner.weights.remote()  # put once, read by every generator
        _get(
            [g.load_weights.remote(weights) for g in self.roles.generators],
            self.timeout,
            "loading new weights into the rollout generators",
        )
        times["sync"] = time.perf_counter() - t
        if not self.ppo.overlap and more:
            pending = self._dispatch()
        for stage, seconds in times.items():
            self.stage_totals[stage] += seconds
        return pending, stats, times

    def _wait(self, refs: list, stage: str, since: float | None = None) -> float:
        """Seconds from `since` (default: now) until every ref is ready; nothing is fetched."""
        since = time.perf_counter() if since is None else since
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout, fetch_local=False)
        if len(ready) < len(refs):
            raise TimeoutError(
                f"PPO stage '{stage}' did not finish within run.ray_timeout_s={self.timeout:g}s"
            )
        return time.perf_counter() - since


def _get(refs, timeout: float, what: str):
    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError as err:
        raise TimeoutError(f"{what} took longer than run.ray_timeout_s={timeout:g}s") from err
