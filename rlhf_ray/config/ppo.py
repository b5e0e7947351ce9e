"""The PPO phase's settings: the estimator, the update, the KL penalty, the rollout generators'
count and scaling, asynchronous sampling, and fault tolerance."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from rlhf_ray.config.section import Section
from rlhf_ray.ppo import staleness

# How PPO estimates advantages: GAE with a critic, or a critic-free baseline (ppo/estimators.py)
ESTIMATORS = ("gae", "rloo", "grpo", "reinforce++")
GROUP_ESTIMATORS = ("rloo", "grpo")  # compare the k samples of a prompt with each other
# Where each estimator's paper puts the KL penalty: in the per-token reward (PPO, REINFORCE++;
# RLOO's sequence reward is their sum) or as a loss term (GRPO).
KL_PLACEMENT = {"gae": "reward", "rloo": "reward", "grpo": "loss", "reinforce++": "reward"}


@dataclass(frozen=True)
class PPOConfig(Section):
    """PPO as an actor system. Defaults follow "The N Implementation Details of RLHF with PPO"."""

    section: ClassVar[str] = "ppo"
    steps: int = 40  # PPO iterations: generate, score, reference, learn, sync
    # advantages: gae (with a critic, PPO proper), or critic-free rloo, grpo or reinforce++
    estimator: str = "gae"
    # rollout generators at the start; rollouts_per_step is split over them as evenly as can
    # be, and `rlhf-ray scale --rollout N` changes their number while the job runs
    num_rollout_actors: int = 1
    # fixed: that many generators (or what `rlhf-ray scale` asks); auto: before each step as
    # many as the live nodes hold beside the other roles, within the two bounds below, so
    # generators start on nodes that join and the run goes on without those of nodes that leave
    rollout_scaling: str = "fixed"
    min_rollout_actors: int = 1  # auto: fewer fit, and the run stops with an error
    max_rollout_actors: int = 8  # auto: never more than this
    rollouts_per_step: int = 64  # responses sampled per iteration
    samples_per_prompt: int = 1  # k responses per prompt (a group); rloo and grpo need k >= 2
    # the KL penalty: in the reward or as a loss term; auto = as the estimator's paper does
    # (loss for grpo, reward for the others)
    kl_placement: str = "auto"
    minibatch_size: int = 16  # responses per gradient step of the learner
    epochs: int = 4  # passes of the learner over each batch
    lr: float = 5e-4  # learning rate of the policy's LoRA adapter
    # the adapter's learning rate over the steps: constant, or linear decay to lr / steps at the
    # last step, after lr_warmup_steps of linear warm-up (rlhf_ray/ppo/lr_schedule.py)
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0  # updates of linear warm-up of the adapter's learning rate
    critic_lr: float = 1e-3  # learning rate of the critic (its own optimizer)
    weight_decay: float = 0.01  # AdamW weight decay of the policy's adapter and of the critic
    kl_coef: float = 0.1  # beta: the KL penalty's weight, in the reward or the loss
    # adaptive KL (Ziegler et al. 2019): beta starts at kl_coef and after each step moves by
    # clip(kl / kl_target - 1, -0.2, 0.2) * rollouts_per_step / kl_horizon; 0: beta fixed
    kl_target: float = 0.0  # the KL (objective/kl) the adaptive beta aims at; 0: beta fixed
    kl_horizon: int = 10000  # rollouts over which beta may change by about e^(+-0.2)
    gamma: float = 1.0  # discount of GAE and of REINFORCE++ returns
    lam: float = 0.95  # lambda of GAE
    clip_range: float = 0.2  # PPO ratio clip
    value_clip_range: float = 0.2  # critic value clip around the rollout's values
    max_grad_norm: float = 1.0  # policy and critic gradients each clipped to this norm
    # early stop [SB3]: a minibatch whose approx-KL to the rollout's policy (measured before its
    # step) passes this ends the step's update, without its own step; 0: every epoch runs
    target_kl: float = 0.0
    temperature: float = 1.0  # sampling temperature; every logprob uses logits / temperature
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response with no EOS
    whiten_rewards: bool = False  # rescale per-token rewards to unit variance before GAE
    # generate the next batches while the learner updates, up to max_policy_lag versions behind
    overlap: bool = False
    # how a batch sampled by an older policy version is trained on: "ppo" clips the ratio to
    # the policy that sampled it; "decoupled" (Hilton et al. 2021, AReaL) clips it around the
    # learner's weights before this update (one no-grad pass, the proximal policy) and weighs
    # each token by min(pi_proximal / pi_behaviour, rollout.tis_cap). At lag 0 both are PPO.
    objective: str = "ppo"
    # with overlap, k: no batch is trained on more than k updates after the version that
    # sampled it (the generators run up to k batches ahead of the learner)
    max_policy_lag: int = 1
    # with overlap: "wait": the generators stop k batches ahead, each batch is trained on k
    # versions old; "drop": they never wait, a step trains on the newest sampled batch and
    # drops the older ones (rlhf_ray/ppo/staleness.py)
    stale_batches: str = "wait"
    max_role_restarts: int = 3  # restarts of a dead rollout generator, reward scorer or reference
    max_learner_restarts: int = 2  # times a dead learner is rebuilt from the newest checkpoint
    checkpoint_every: int = 10  # steps between PPO checkpoints (0: only when the job is stopped)
    keep_checkpoints: int = 2  # newest complete PPO checkpoints kept; older ones are deleted

    def validate(self) -> None:
        self.one_of("estimator", ESTIMATORS)
        self.one_of("kl_placement", ("auto", "reward", "loss"))
        self.one_of("objective", ("ppo", "decoupled"))
        self.one_of("stale_batches", staleness.MODES)
        self.positive("steps", "num_rollout_actors", "rollouts_per_step", "minibatch_size")
        self.positive("samples_per_prompt", "min_rollout_actors", "max_rollout_actors")
        self.one_of("rollout_scaling", ("fixed", "auto"))
        self.check(
            self.min_rollout_actors <= self.max_rollout_actors,
            "max_rollout_actors",
            f">= min_rollout_actors={self.min_rollout_actors}",
        )
        self.check(
            self.min_rollout_actors <= self.num_rollout_actors <= self.max_rollout_actors
            or self.rollout_scaling == "fixed",
            "num_rollout_actors",
            f"within min_rollout_actors={self.min_rollout_actors} and max_rollout_actors="
            f"{self.max_rollout_actors} when rollout_scaling is auto",
        )
        self.check(
            self.estimator not in GROUP_ESTIMATORS or self.samples_per_prompt >= 2,
            "samples_per_prompt",
            f"at least 2 with estimator {self.estimator} (it compares the samples of a prompt)",
        )
        self.check(
            self.rollouts_per_step % self.samples_per_prompt == 0,
            "rollouts_per_step",
            f"a multiple of samples_per_prompt={self.samples_per_prompt}",
        )
        self.positive("epochs", "lr", "critic_lr", "clip_range", "value_clip_range")
        self.positive("max_grad_norm", "temperature")
        self.non_negative("target_kl", "kl_target", "lr_warmup_steps")
        self.one_of("lr_schedule", ("constant", "linear"))
        self.check(self.lr_warmup_steps < self.steps, "lr_warmup_steps", f"< steps={self.steps}")
        self.positive("kl_horizon")
        self.non_negative("kl_coef", "missing_eos_penalty", "max_policy_lag", "weight_decay")
        self.non_negative("max_role_restarts", "max_learner_restarts", "checkpoint_every")
        self.positive("keep_checkpoints")
        self.check(0 < self.gamma <= 1, "gamma", "a discount in (0, 1]")
        self.check(0 <= self.lam <= 1, "lam", "a value in [0, 1]")
        self.check(
            self.rollouts_per_step % self.minibatch_size == 0,
            "minibatch_size",
            f"a divisor of rollouts_per_step={self.rollouts_per_step}",
        )
        self.check(
            not self.overlap or self.max_policy_lag >= 1,
            "max_policy_lag",
            ">= 1 when overlap is on (the next batch is sampled one version behind)",
        )

    @property
    def uses_critic(self) -> bool:
        return self.estimator == "gae"

    @property
    def autoscales(self) -> bool:
        return self.rollout_scaling == "auto"

    def unused_settings(self) -> list[str]:
        """`ppo.key=value` for each setting changed from its default that this estimator (the
        critic's, GAE's), fixed scaling (the auto bounds) or no overlap (the objective and bound
        for lagging batches) does not use, so the run can say so instead of dropping it silently."""
        critics = ("critic_lr", "value_clip_range", "lam", "whiten_rewards")
        unused = () if self.uses_critic else critics
        unused += ("gamma",) if self.estimator in GROUP_ESTIMATORS else ()
        unused += ("min_rollout_actors", "max_rollout_actors") if not self.autoscales else ()
        # without overlap no batch lags
        unused += ("objective", "max_policy_lag", "stale_batches") if not self.overlap else ()
        defaults = {f.name: f.default for f in fields(self)}
        return [f"ppo.{k}={getattr(self, k)}" for k in unused if getattr(self, k) != defaults[k]]

    @property
    def kl_in_loss(self) -> bool:
        placement = (
            KL_PLACEMENT[self.estimator] if self.kl_placement == "auto" else self.kl_placement
        )
        return placement == "loss"

    @property
    def reward_kl_coef(self) -> float:
        """beta of the KL penalty in the per-token rewards: kl_coef, or 0 when the KL is a loss
        term instead."""
        return 0.0 if self.kl_in_loss else self.kl_coef

    @property
    def loss_per_sequence(self) -> bool:
        """GRPO averages each response's token losses first, then over responses."""
        return self.estimator == "grpo"

    @property
    def prompts_per_step(self) -> int:
        return self.rollouts_per_step // self.samples_per_prompt
