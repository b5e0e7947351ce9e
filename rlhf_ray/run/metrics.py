"""Every metric name in one place (TRL's names where TRL has one); rlhf_ray.run.trackers writes
them."""

from __future__ import annotations

import re

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
# scores - the KL penalty the rewards hold: kl_coef * kl, or nothing when ppo.kl_placement puts
# the KL in the loss (GRPO's default; then loss/kl_avg is its k3 estimate, weighted by kl_coef)
RLHF_REWARD = "objective/rlhf_reward"
NON_SCORE_REWARD = "objective/non_score_reward"  # -(that KL penalty): rlhf_reward - scores
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
# The heavy tail of the per-response KL (the summed k1 of each response): one response far from
# the reference moves objective/kl (the mean) by kl_max / rollouts_per_step.
KL_MAX = "objective/kl_max"  # the largest response's summed KL
KL_MEDIAN = "objective/kl_median"  # the median response's
KL_TOKEN_MAX = "objective/kl_token_max"  # the largest single token's k1 (logp - logp_ref)
# The update's diagnostics, over its minibatch steps (each minibatch's before its own step):
APPROXKL_MAX = "policy/approxkl_max"  # the largest minibatch approx-KL
CLIPFRAC_MAX = "policy/clipfrac_max"
LOGRATIO_MAX = "policy/logratio_max"  # the largest |logp - logp_old| of a token
GRAD_NORM = "policy/grad_norm_avg"  # the policy's gradient norm before clipping, mean
GRAD_NORM_MAX = "policy/grad_norm_max"  # and the largest
# minibatch steps taken: epochs x minibatches, fewer when ppo.target_kl stopped the update
MINIBATCH_STEPS = "policy/minibatch_steps"
ADVANTAGE_ABSMAX = "val/advantage_absmax"  # the largest |advantage| (after whitening)
ADVANTAGE_RAW_STD = "val/advantage_raw_std"  # gae: the std of the advantages before whitening
LEARNING_RATE = "policy/lr"  # the adapter's learning rate of the step's update (ppo.lr_schedule)
KL_COEF = "objective/kl_coef"  # the KL penalty's weight this step (ppo.kl_target adapts it)
RESPONSE_LENGTH = "val/response_length"  # mean response tokens, EOS included
NO_EOS_FRACTION = "val/no_eos_fraction"
# Staleness of the step's rows: the learner's version (updates done) minus the version that
# sampled each row, mean and largest; and the rows sampled but dropped this step as stale
# (ppo.stale_batches drop: the older batches when a newer one is sampled)
STALENESS_MEAN = "rollout/staleness_mean"
STALENESS_MAX = "rollout/staleness_max"
DROPPED = "rollout/dropped"
# partial rollouts (rollout.partial_chunk_tokens): the share of the step's response tokens
# sampled by a newer policy version than the first token of their response
PARTIAL_TOKENS = "rollout/partial_token_share"
GENERATORS = "rollout/generators"  # rollout generators that sampled the step's batch
# vLLM engine: |learner - sampler| logprob of the sampled tokens, mean over tokens and max
LOGPROB_GAP_MEAN = "rollout/logprob_gap_mean"
LOGPROB_GAP_MAX = "rollout/logprob_gap_max"
TIS_WEIGHT = "rollout/tis_weight_mean"  # rollout.logprob_correction tis: mean truncated weight
SYNC_BYTES = "perf/sync_bytes"  # bytes of the weights put in the object store per sync
TOKENS_PER_S = "perf/tokens_per_s"  # prompt+response tokens through a whole PPO step
# Not logged: the learner's count of prompt+response tokens in a batch, which the driver sums
# into TOKENS_PER_S. A constant because it crosses from the learner's process to the driver.
BATCH_TOKENS = "batch/tokens"
STAGES = ("generate", "score", "reference", "learn", "sync")

# Evaluation during PPO (eval.every): the held-out prompts sampled with the policy as it is
EVAL_SCORE = "eval/score"  # the mean score steps are ranked by (gold judge, else reward model)
EVAL_KL = "eval/kl"  # mean summed k1 KL to the reference of the held-out responses
EVAL_RESPONSE_LENGTH = "eval/response_length"
EVAL_BEST_STEP = "eval/best_step"  # the best evaluated step so far (exported as policy/)
EVAL_SECONDS = "time/eval_s"  # sampling, scoring and the reference, plus any export


def eval_judge(judge: str) -> str:
    """`eval/<judge>`: one judge's mean score of the held-out responses during PPO (gold_judge,
    reward_model, a reward function's module:function, total)."""
    return f"eval/{judge}"


def approxkl_epoch(epoch: int) -> str:
    """`policy/approxkl_epoch<N>`: the mean approx-KL of the update's epoch N (1-based)."""
    return f"policy/approxkl_epoch{epoch}"


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


# The PPO metrics the Ray dashboard's Metrics view (and any Prometheus/Grafana scraping the
# cluster) shows, as gauges named by `dashboard_name`; Ray prefixes "ray_" when exporting.
DASHBOARD = (
    SCORES,
    KL,
    RLHF_REWARD,
    RESPONSE_LENGTH,
    STALENESS_MEAN,
    STALENESS_MAX,
    DROPPED,
    TOKENS_PER_S,
    GENERATORS,
    *(stage_time(stage) for stage in STAGES),
)
DASHBOARD_STEP = "ppo/step"  # the last PPO step done


def dashboard_name(name: str) -> str:
    """`rlhf_<name>` with every character Prometheus does not allow as "_":
    objective/kl -> rlhf_objective_kl; rollout/<generator>/<stat> -> rlhf_rollout_<stat> (the
    generator goes in a tag)."""
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "rollout":
        name = f"rollout/{parts[2]}"
    return "rlhf_" + re.sub(r"[^A-Za-z0-9_]", "_", name)
