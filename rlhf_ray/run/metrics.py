"""Every metric name in one place (TRL's names where TRL has one), and the TensorBoard writer."""

from __future__ import annotations

from pathlib import Path

# Supervised fine-tuning
SFT_LOSS = "sft/loss"  # completion-only cross-entropy, per optimizer step
SFT_EPOCH_LOSS = "sft/epoch_loss"
SFT_TOKENS_PER_S = "sft/tokens_per_s"

# Reward model (Bradley-Terry)
REWARD_LOSS = "reward/loss"
REWARD_ACCURACY = "reward/accuracy"  # training pairs, per step
REWARD_MARGIN = "reward/margin"  # mean score(chosen) - score(rejected)
REWARD_EVAL_ACCURACY = "reward/eval_accuracy"  # held-out pairs, against their (noisy) labels
REWARD_EVAL_MARGIN = "reward/eval_margin"

# PPO (names as in TRL's PPOTrainer)
KL = "objective/kl"  # mean over rollouts of the summed per-token k1 KL to the reference
SCORES = "objective/scores"  # reward-model score (after the missing-EOS penalty)
RLHF_REWARD = "objective/rlhf_reward"  # scores - kl_coef * kl
NON_SCORE_REWARD = "objective/non_score_reward"
APPROXKL = "policy/approxkl_avg"
CLIPFRAC = "policy/clipfrac_avg"
ENTROPY = "policy/entropy_avg"
POLICY_LOSS = "loss/policy_avg"
VALUE_LOSS = "loss/value_avg"  # with a critic (ppo.estimator gae) only
KL_LOSS = "loss/kl_avg"  # the k3 KL term, when ppo.kl_placement puts the KL in the loss
VALUE_CLIPFRAC = "val/clipfrac_avg"
RATIO = "val/ratio"  # mean PPO ratio over every minibatch step of an iteration
# The ratio of an iteration's first minibatch, before any update: 1 unless the rollout's
# logprobs differ from the learner's own forward pass (padding, positions, temperature).
RATIO_FIRST = "val/ratio_first"
RESPONSE_LENGTH = "val/response_length"  # mean response tokens, EOS included
NO_EOS_FRACTION = "val/no_eos_fraction"
POLICY_LAG = "policy/version_lag"  # learner version minus the rollout's policy_version
GENERATORS = "rollout/generators"  # rollout generators that sampled the step's batch
TOKENS_PER_S = "perf/tokens_per_s"  # prompt+response tokens through a whole PPO step
# Not logged: the learner's count of prompt+response tokens in a batch, which the driver sums
# into TOKENS_PER_S. A constant because it crosses from the learner's process to the driver.
BATCH_TOKENS = "batch/tokens"
STAGES = ("generate", "score", "reference", "learn", "sync")


def reward_source(source: str) -> str:
    """`rewards/<source>`: the mean unweighted score of one source the reward scorer adds up
    ("reward_model", or a reward function's module:function)."""
    return f"rewards/{source}"


def stage_time(stage: str) -> str:
    """`time/<stage>_s` for one of STAGES."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    return f"time/{stage}_s"


GENERATOR_STATS = ("completions_per_s", "policy_version")


def generator_stat(generator: str, stat: str) -> str:
    """`rollout/<generator>/<stat>` for one of GENERATOR_STATS: each generator's completions
    per second of its own sampling time, and the policy version its batch was sampled with."""
    if stat not in GENERATOR_STATS:
        raise ValueError(f"unknown generator stat {stat!r}; stats: {GENERATOR_STATS}")
    return f"rollout/{generator}/{stat}"


def role_busy(role: str) -> str:
    """`roles/<role>_busy`: the share of PPO wall time a role's process spent working, so far
    (the actor names: learner, reward, reference, rollout-<rank>)."""
    return f"roles/{role}_busy"


class MetricWriter:
    """Scalars to TensorBoard under `log_dir` (SummaryWriter is created lazily, once)."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        """`purge_step`: on resume, the first step written again; TensorBoard hides what an
        earlier process wrote in this directory from that step on, so each step shows once."""
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self._writer.add_scalar(name, float(value), step)

    def close(self) -> None:
        self._writer.close()
