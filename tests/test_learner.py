"""The Ray-free PPO learner on real rollouts of a tiny untrained model (no Ray needed)."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rlhf_ray.config import RolloutConfig
from rlhf_ray.config.loading import config_from_yaml
from rlhf_ray.data.encoding import prompt_ids
from rlhf_ray.data.prepare import limits_of, read_rows
from rlhf_ray.errors import ConfigError, RoleFailed
from rlhf_ray.models.loading import FrozenModelSettings
from rlhf_ray.ppo.learner import LearnerCore
from rlhf_ray.ppo.messages import ReferenceLogprobs, Scores, concat_batches
from rlhf_ray.ppo.reference_model import ReferenceCore
from rlhf_ray.ppo.reward_scorer import ScorerCore
from rlhf_ray.ppo.rollout_generator import HFGeneratorCore
from rlhf_ray.ppo.settings import LearnerSettings, PolicySettings, ScorerSettings
from rlhf_ray.run import metrics
from tests.conftest import raises_with, smoke_config


def _sharp_policy(sft_dir: Path, out_dir: Path) -> Path:
    """The SFT directory with 2 layers re-drawn at init std 0.5 (seed 0).

    The untrained smoke model is nearly uniform (every logprob about -ln 320), so a
    learner that let the prompt's padding into attention would move the first ratio by only
    ~1e-4. With sharp logits and two layers the same mistake moves it by ~4e-2. (An offset
    in the position ids cannot show here: RoPE depends only on relative positions.)
    """
    shutil.copytree(sft_dir, out_dir)
    config = AutoConfig.from_pretrained(sft_dir)
    config.num_hidden_layers, config.initializer_range = 2, 0.5
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def rollouts(tiny_run, tmp_path_factory):
    """Two zero-lag shards whose prompts have different widths, scored and referenced.

    Returns (LearnerSettings, [shard, shard], Scores of both, [ref_logprobs, ref_logprobs]).
    """
    out, prepared = tiny_run
    cfg = smoke_config(out)
    sft_dir = _sharp_policy(out / "sft", tmp_path_factory.mktemp("sharp") / "sft")
    policy = PolicySettings(
        str(sft_dir),
        cfg.model,
        cfg.quantization,
        cfg.lora,
        limits_of(cfg.data),
        cfg.ppo.temperature,
        1,
        0,
        cfg.run.seed,
    )
    # One minibatch of all 8 rollouts: the first step sees every row of both shards.
    ppo = replace(cfg.ppo, rollouts_per_step=8, minibatch_size=8, epochs=1)
    settings = LearnerSettings(policy, str(out / "reward"), cfg.reward.method, ppo)
    weights = LearnerCore(settings).weights()  # version 0, as the driver syncs before step 1
    generator = HFGeneratorCore(policy, rank=0)
    generator.load_weights(weights)

    prompts = [row["prompt"] for row in read_rows(prepared.data_dir, "prompts")]
    width = {p: len(prompt_ids(generator.tok, p, policy.limits)) for p in prompts}
    prompts.sort(key=width.get)
    shards = [
        generator.generate(prompts[:4], [0, 1, 2, 3]),
        generator.generate(prompts[-4:], [4, 5, 6, 7]),
    ]
    assert shards[0].query.shape[1] < shards[1].query.shape[1]  # re-padded when concatenated

    frozen = dict(model=cfg.model, quantization=cfg.quantization, cpus=1, gpus=0)
    reward_model = FrozenModelSettings(str(out / "reward"), **frozen)
    scorer = ScorerCore(ScorerSettings(reward_model, 1.0, (), (), str(sft_dir), False))
    reference = ReferenceCore(FrozenModelSettings(str(sft_dir), **frozen), policy.temperature)
    scores = scorer.score(shards)
    refs = [reference.logprobs(shard) for shard in shards]
    return settings, shards, scores, refs


def test_ratio_of_the_first_minibatch_is_one_at_zero_lag(rollouts):
    """Before any update the learner's logprobs must equal the rollout's, row by row, even
    though the learner sees both shards' prompts left-padded to one common width."""
    settings, shards, scores, refs = rollouts
    learner = LearnerCore(settings)
    stats = learner.train(shards, scores, refs)
    print(f"val/ratio_first = {stats[metrics.RATIO_FIRST]!r}")
    assert stats[metrics.STALENESS_MAX] == 0
    assert stats[metrics.RATIO_FIRST] == pytest.approx(1.0, abs=1e-5)
    # One minibatch and one epoch: the averaged stats are the first step's. approxkl is
    # 0.5 * mean(log-ratio^2), so deviations that cancel in the mean ratio still show here.
    assert stats[metrics.RATIO] == stats[metrics.RATIO_FIRST]
    assert stats[metrics.APPROXKL] < 1e-10


def test_one_step_trains_policy_and_critic_and_kl_is_policy_minus_reference(rollouts):
    """No vf_coef: each loss still moves its own model. The KL is logp_policy - logp_ref."""
    settings, shards, _, _ = rollouts
    learner = LearnerCore(settings)
    before = {
        name: [p.detach().clone() for p in params] for name, (params, _) in learner.trained.items()
    }
    assert set(before) == {"policy", "critic"}
    # Reference logprobs 0.25 below the rollout's on every real token: kl = +0.25 per token,
    # so objective/kl (summed per response, mean over responses) = 0.25 * mean length.
    refs = [ReferenceLogprobs(s.key, (s.logprobs - 0.25) * s.response_mask) for s in shards]
    scores = Scores(torch.zeros(8), {}, [s.key for s in shards])
    stats = learner.train(shards, scores, refs)  # one minibatch of all rows, one epoch

    lengths = torch.cat([s.response_mask.sum(1) for s in shards])
    assert stats[metrics.KL] == pytest.approx(0.25 * lengths.mean().item(), abs=1e-4)
    assert stats[metrics.RESPONSE_LENGTH] == pytest.approx(lengths.mean().item())
    no_eos = torch.cat([~s.has_eos for s in shards]).float()
    assert stats[metrics.SCORES] == pytest.approx(-settings.ppo.missing_eos_penalty * no_eos.mean())
    assert stats[metrics.VALUE_LOSS] > 0 and stats[metrics.POLICY_LOSS] != 0
    for name, (params, _) in learner.trained.items():
        moved = [not torch.equal(a, b) for a, b in zip(before[name], params, strict=True)]
        assert any(moved), f"the {name} did not change after one minibatch step"


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_rlhf_reward_subtracts_only_the_kl_penalty_the_reward_holds(rollouts, estimator):
    """objective/rlhf_reward is the score minus the KL penalty in the per-token rewards: with
    the KL as a loss term (GRPO's placement) the rewards hold none, and loss/kl_avg shows it."""
    settings, shards, _, _ = rollouts
    ppo = replace(settings.ppo, estimator=estimator, samples_per_prompt=2, kl_coef=0.5)
    learner = LearnerCore(replace(settings, ppo=ppo))
    grouped = [
        replace(shards[0], group=torch.tensor([0, 0, 1, 1])),
        replace(shards[1], group=torch.tensor([2, 2, 3, 3])),
    ]
    # kl 0.25 per token
    refs = [ReferenceLogprobs(s.key, (s.logprobs - 0.25) * s.response_mask) for s in shards]
    stats = learner.train(grouped, Scores(torch.ones(8), {}, [s.key for s in shards]), refs)

    lengths = torch.cat([s.response_mask.sum(1) for s in shards])
    kl = 0.25 * lengths.mean().item()
    assert stats[metrics.KL] == pytest.approx(kl, abs=1e-4)
    penalty = 0.0 if ppo.kl_in_loss else 0.5 * kl
    assert stats[metrics.NON_SCORE_REWARD] == pytest.approx(-penalty, abs=1e-4)
    assert stats[metrics.RLHF_REWARD] == pytest.approx(stats[metrics.SCORES] - penalty, abs=1e-4)
    assert (metrics.KL_LOSS in stats) == ppo.kl_in_loss


def test_policy_and_critic_optimizers_take_the_ppo_weight_decay(rollouts):
    settings, _, _, _ = rollouts
    assert (
        settings.ppo.weight_decay == 0.01
    )  # the default: AdamW's, applied before it was a setting
    learner = LearnerCore(replace(settings, ppo=replace(settings.ppo, weight_decay=0.2)))
    decays = {
        name: opt.param_groups[0]["weight_decay"] for name, (_, opt) in learner.trained.items()
    }
    assert decays == {"policy": 0.2, "critic": 0.2}


def test_vf_coef_is_an_unknown_key():
    """vf_coef was removed (it was a no-op with two Adam optimizers); using it is an error."""
    with raises_with("unknown key ppo.vf_coef", "critic_lr", exc=ConfigError):
        config_from_yaml("ppo:\n  vf_coef: 0.1\n", "test.yaml")
    assert "vf_coef" not in vars(config_from_yaml("", "empty").ppo)


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce++"])
def test_critic_free_learner_holds_no_critic_and_trains_the_policy(rollouts, estimator):
    """No critic is built (its path does not even exist), checkpointed or trained; groups of 2
    are found whole although groups 1 and 2 are split over the two shards."""
    settings, shards, scores, refs = rollouts
    ppo = replace(settings.ppo, estimator=estimator, samples_per_prompt=2)
    learner = LearnerCore(replace(settings, ppo=ppo, critic_path="/nonexistent/critic"))
    assert learner.critic is None and list(learner.trained) == ["policy"]
    grouped = [
        replace(shards[0], group=torch.tensor([0, 0, 1, 2])),
        replace(shards[1], group=torch.tensor([1, 2, 3, 3])),
    ]
    before = [p.detach().clone() for p in learner.trained["policy"][0]]
    stats = learner.train(grouped, scores, refs)
    assert metrics.VALUE_LOSS not in stats and metrics.VALUE_CLIPFRAC not in stats
    assert (metrics.KL_LOSS in stats) == (estimator == "grpo")  # GRPO: the KL is a loss term
    assert stats[metrics.RATIO_FIRST] == pytest.approx(1.0, abs=1e-5)
    after = learner.trained["policy"][0]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    tensors, state = learner.checkpoint_state()
    assert not any(name.startswith("critic") for name in tensors) and "critic_opt" not in state


def test_a_step_with_an_incomplete_prompt_group_is_refused(rollouts):
    settings, shards, scores, refs = rollouts
    ppo = replace(settings.ppo, estimator="rloo", samples_per_prompt=2)
    learner = LearnerCore(replace(settings, ppo=ppo))
    broken = [shards[0], replace(shards[1], group=torch.tensor([0, 0, 1, 1]))]  # 0..3 once each
    with pytest.raises(RuntimeError, match="prompt groups of sizes \\[1, 3\\]"):
        learner.train(broken, scores, refs)


def test_a_batch_sampled_again_after_it_was_scored_is_refused(rollouts):
    """Ray rebuilding a lost batch by running `generate` again gives another batch (here one
    token narrower); its scores and reference logprobs are the first batch's. Before batch ids
    the learner padded the old logprobs to fit and trained on the mismatched rows."""
    settings, shards, scores, refs = rollouts
    first = shards[1]
    again = replace(
        first,
        response=first.response[:, :-1],
        response_mask=first.response_mask[:, :-1],
        logprobs=first.logprobs[:, :-1],
        batch_id="sampled-again",
    )
    learner = LearnerCore(settings)
    with raises_with(
        "the reward scorer's scores are of", first.key.describe(), "sampled-", exc=RoleFailed
    ):
        learner.train([shards[0], again], scores, refs)
    assert learner.version == 0  # nothing trained


def test_reward_sources_are_logged_unweighted(rollouts):
    settings, shards, _, refs = rollouts
    rm, rule = torch.linspace(-1, 1, 8), torch.ones(8)
    components = {"reward_model": rm, "tests.rules:f": rule}
    scores = Scores(0.5 * rm + 2.0 * rule, components, [s.key for s in shards])
    stats = LearnerCore(settings).train(shards, scores, refs)
    assert stats[metrics.reward_source("reward_model")] == pytest.approx(0.0, abs=1e-6)
    assert stats[metrics.reward_source("tests.rules:f")] == 1.0


def test_with_logprobs_from_the_learner_it_trains_on_its_own_and_logs_the_samplers_gap(rollouts):
    """A sampler whose logprobs are off by a known amount (as another implementation of the
    model may be): the learner's ratio still starts at 1, the gap is measured, and tis weights
    each token by min(pi_learner / pi_sampler, cap)."""
    settings, shards, scores, refs = rollouts
    # sampler logprobs: the learner's own + 0.5 on row 0's first token, -0.05 elsewhere
    skewed = []
    for shard in shards:
        logprobs = shard.logprobs - 0.05 * shard.response_mask
        skewed.append(replace(shard, logprobs=logprobs))
    skewed[0].logprobs[0, 0] = shards[0].logprobs[0, 0] + 0.5
    rollout = replace(RolloutConfig(), logprob_correction="tis", tis_cap=1.02)
    learner = LearnerCore(replace(settings, logprob_source="learner", rollout=rollout))
    stats = learner.train(skewed, scores, refs)
    assert stats[metrics.RATIO_FIRST] == pytest.approx(1.0, abs=1e-5)  # its own old logprobs
    assert stats[metrics.LOGPROB_GAP_MAX] == pytest.approx(0.5, abs=1e-5)
    tokens = sum(int(s.response_mask.sum()) for s in shards)
    # |gap| is 0.05 on every token but one, which is 0.5
    mean_gap = (0.05 * (tokens - 1) + 0.5) / tokens
    assert stats[metrics.LOGPROB_GAP_MEAN] == pytest.approx(mean_gap, abs=1e-5)
    # weights: exp(+0.05) = 1.0513 capped at 1.02 on all tokens but one, exp(-0.5) = 0.6065
    mean_weight = (1.02 * (tokens - 1) + 0.6065307) / tokens
    assert stats[metrics.TIS_WEIGHT] == pytest.approx(mean_weight, abs=1e-5)
    # the sampler's logprobs used as they are: none of these stats
    plain = LearnerCore(settings).train(shards, scores, refs)
    assert metrics.LOGPROB_GAP_MAX not in plain and metrics.TIS_WEIGHT not in plain


def test_tis_weights_reach_the_policy_loss(rollouts):
    """Sampler logprobs ln 2 below the learner's on the first shard's tokens: their truncated
    weights are min(2, cap 3) = 2, the other shard's 1. At ratio 1 the first minibatch's loss is
    -mean(weight * advantage); advantages are whitened (mean 0), so without weights it is ~0,
    and with them it is -(the first shard's advantage sum) / tokens, which is not."""
    settings, shards, scores, refs = rollouts
    first = shards[0]
    skewed = [replace(first, logprobs=first.logprobs - math.log(2) * first.response_mask)]
    rollout = replace(RolloutConfig(), logprob_correction="tis", tis_cap=3.0)
    weighted = LearnerCore(replace(settings, logprob_source="learner", rollout=rollout))
    stats = weighted.train([*skewed, shards[1]], scores, refs)
    plain = LearnerCore(settings).train(shards, scores, refs)
    tokens = [int(s.response_mask.sum()) for s in shards]
    mean_weight = (2 * tokens[0] + tokens[1]) / sum(tokens)
    assert stats[metrics.TIS_WEIGHT] == pytest.approx(mean_weight, abs=1e-4)
    assert abs(plain[metrics.POLICY_LOSS]) < 1e-5  # whitened advantages, ratio 1
    assert abs(stats[metrics.POLICY_LOSS]) > 1e-3  # the weights reached the loss


def test_batches_a_vllm_generator_sampled_are_recomputed_whatever_the_source(rollouts):
    """Under rollout.engine auto each generator picks its engine: the learner recomputes the
    logprobs of a step where any batch came from vLLM, even with logprob_source sampler."""
    settings, shards, scores, refs = rollouts
    skewed = [replace(s, logprobs=s.logprobs - 0.05 * s.response_mask) for s in shards]
    mixed = [replace(skewed[0], engine="vllm"), skewed[1]]
    stats = LearnerCore(settings).train(mixed, scores, refs)
    assert stats[metrics.RATIO_FIRST] == pytest.approx(1.0, abs=1e-5)
    assert stats[metrics.LOGPROB_GAP_MAX] == pytest.approx(0.05, abs=1e-5)


def _frozen_reward_model(settings: LearnerSettings) -> FrozenModelSettings:
    policy = settings.policy
    return FrozenModelSettings(settings.critic_path, policy.model, policy.quantization, 1, 0)


def test_evaluation_kl_is_the_summed_policy_minus_reference_logprob_of_each_response(rollouts):
    """The held-out evaluation during PPO (eval.every): reference logprobs 0.5 below the
    samples' on every real token give KL 0.5 * length per response, 0.5 * mean length in all;
    the gold judge scores the synthetic prompts, the reward model as score() does."""
    settings, shards, _, _ = rollouts
    shard = shards[0]
    scorer = ScorerCore(
        ScorerSettings(_frozen_reward_model(settings), 1.0, (), (), settings.policy.sft_path, False)
    )
    reference = ReferenceLogprobs(shard.key, (shard.logprobs - 0.5) * shard.response_mask)
    means = scorer.evaluate(shard, reference)
    lengths = shard.response_mask.sum(1).float()
    assert means["kl"] == pytest.approx(0.5 * lengths.mean().item(), abs=1e-5)
    assert means["response_length"] == pytest.approx(lengths.mean().item())
    rm = scorer.score([shard]).components["reward_model"]
    assert means["reward_model"] == pytest.approx(rm.mean().item())
    assert means["total"] == pytest.approx(rm.mean().item())
    assert "gold_judge" in means  # the smoke prompts are the synthetic world's
    with raises_with("another batch", exc=RoleFailed):
        scorer.evaluate(shards[1], reference)


def test_a_staged_step_is_exported_later_while_training_went_on(rollouts, tmp_path):
    """`stage` keeps the policy's LoRA weights of a step; `export` of the last step merges the
    trained policy; `export` with the staged weights builds the step's policy afresh."""
    from safetensors.torch import load_file

    from rlhf_ray.run.best_step import STEP_WEIGHTS

    settings, shards, scores, refs = rollouts
    learner = LearnerCore(settings)
    learner.stage(str(tmp_path / "staged"), {"step": 0})
    staged = load_file(tmp_path / "staged" / STEP_WEIGHTS)
    assert staged.keys() == learner.weights().tensors.keys()
    learner.train(shards, scores, refs)
    trained = learner.weights().tensors
    assert any(not trained[n].equal(staged[n]) for n in staged)  # the step moved the LoRA
    learner.export(str(tmp_path / "last"), {"steps": 1})
    learner.export(str(tmp_path / "best"), {"steps": 1}, str(tmp_path / "staged" / STEP_WEIGHTS))

    def adapter(folder: str) -> dict:
        saved = load_file(tmp_path / folder / "adapter" / "adapter_model.safetensors")
        return {name.replace(".weight", ".default.weight"): t for name, t in saved.items()}

    assert adapter("best").keys() == staged.keys()
    assert all(adapter("best")[n].equal(staged[n]) for n in staged)
    assert all(adapter("last")[n].equal(trained[n]) for n in trained)


def test_target_kl_stops_the_update_at_the_first_minibatch_that_passed_it(rollouts):
    """Two epochs of two minibatches. The first minibatch's approx-KL is 0 (no step yet), so
    it always steps; with a tiny target the second, measured after that step, passes it and
    ends the update: one step. Without a target all four steps run."""
    settings, shards, scores, refs = rollouts
    base = replace(settings.ppo, minibatch_size=4, epochs=2)
    stopped = LearnerCore(replace(settings, ppo=replace(base, target_kl=1e-9)))
    stats = stopped.train(shards, scores, refs)
    assert stats[metrics.MINIBATCH_STEPS] == 1
    assert stats[metrics.APPROXKL_MAX] < 1e-10  # the step taken saw the rollout's policy
    full = LearnerCore(replace(settings, ppo=base)).train(shards, scores, refs)
    assert full[metrics.MINIBATCH_STEPS] == 4
    assert full[metrics.APPROXKL_MAX] > 1e-9
    assert full[metrics.approxkl_epoch(2)] > 0 and metrics.approxkl_epoch(2) not in stats
    assert full[metrics.GRAD_NORM_MAX] >= full[metrics.GRAD_NORM] > 0


def test_target_kl_must_not_be_negative():
    with pytest.raises(ConfigError, match=r"ppo.target_kl=-0.1: expected a number >= 0"):
        config_from_yaml("ppo:\n  target_kl: -0.1\n", "test.yaml")


def test_kl_target_adapts_the_kl_coefficient_after_each_step_and_checkpoints_it(rollouts):
    """The step uses beta = kl_coef and logs it; the next beta follows `adaptive_kl_coef` from
    the step's KL over its 8 rollouts, and survives a checkpoint."""
    settings, shards, scores, refs = rollouts
    ppo = replace(settings.ppo, kl_coef=0.1, kl_target=0.5, kl_horizon=80)
    learner = LearnerCore(replace(settings, ppo=ppo))
    stats = learner.train(shards, scores, refs)
    assert stats[metrics.KL_COEF] == 0.1
    error = min(max(stats[metrics.KL] / 0.5 - 1, -0.2), 0.2)  # 8 rollouts of a horizon of 80
    assert learner.kl_coef == pytest.approx(0.1 * (1 + error * 8 / 80))
    assert learner.kl_coef != 0.1
    tensors, state = learner.checkpoint_state()
    assert state["kl_coef"] == learner.kl_coef
    again = LearnerCore(replace(settings, ppo=ppo))
    again.restore(tensors, state)
    assert again.kl_coef == learner.kl_coef
    fixed = LearnerCore(settings)
    fixed.train(shards, scores, refs)
    assert fixed.kl_coef == settings.ppo.kl_coef  # kl_target 0: beta stays


def test_lr_schedule_sets_the_policy_optimizers_rate_for_each_update(rollouts):
    """linear over 4 steps: the first update at lr, the second at lr * 3/4; the critic keeps
    its own rate."""
    settings, shards, scores, refs = rollouts
    ppo = replace(settings.ppo, steps=4, lr=1e-3, lr_schedule="linear")
    learner = LearnerCore(replace(settings, ppo=ppo))
    assert learner.train(shards, scores, refs)[metrics.LEARNING_RATE] == pytest.approx(1e-3)
    assert learner.train(shards, scores, refs)[metrics.LEARNING_RATE] == pytest.approx(0.75e-3)
    _, policy_opt = learner.trained["policy"]
    assert policy_opt.param_groups[0]["lr"] == pytest.approx(0.75e-3)
    assert learner.trained["critic"][1].param_groups[0]["lr"] == ppo.critic_lr


def test_the_decoupled_objective_is_ppo_at_lag_zero(rollouts):
    """No lag: the proximal policy is the one that sampled the batch, so `ppo.objective
    decoupled` trains exactly as PPO does (nothing recomputed, no weights)."""
    settings, shards, scores, refs = rollouts
    plain = LearnerCore(settings)  # (each learner seeds torch as it is built: build, train)
    plain_stats = plain.train(shards, scores, refs)
    decoupled = LearnerCore(replace(settings, ppo=replace(settings.ppo, objective="decoupled")))
    stats = decoupled.train(shards, scores, refs)
    assert stats == plain_stats
    assert decoupled.trainable_digest() == plain.trainable_digest()
    assert metrics.TIS_WEIGHT not in stats


def test_the_decoupled_objective_clips_around_the_proximal_policy_of_a_lagging_batch(rollouts):
    """A batch one version old: PPO's first ratio is pi_now / pi_behaviour (not 1: the policy
    moved); the decoupled objective's is pi_now / pi_proximal = 1 (the proximal policy is the
    learner as it is), each token weighed by min(pi_proximal / pi_behaviour, tis_cap)."""
    settings, shards, scores, refs = rollouts
    cap = 1.05
    decoupled = replace(settings.ppo, objective="decoupled")
    rollout = replace(RolloutConfig(), tis_cap=cap)
    settings_of = {"ppo": settings, "decoupled": replace(settings, ppo=decoupled, rollout=rollout)}
    stats, digests = {}, {}
    for name, learner_settings in settings_of.items():
        learner = LearnerCore(learner_settings)  # seeds torch as it is built
        learner.train([replace(s) for s in shards], scores, refs)  # now version 1
        digests[name] = learner.trainable_digest()  # the same step: lag 0
        if name == "decoupled":  # its proximal logprobs, by hand: the learner as it is
            batch, _ = concat_batches(shards, learner.tok.pad_token_id)
            proximal = learner._own_logprobs(batch)
            mask = batch.response_mask
            weights = torch.exp(proximal - batch.logprobs).clamp(max=cap)
            expected_weight = float((weights * mask).sum() / mask.sum())
        stats[name] = learner.train([replace(s) for s in shards], scores, refs)  # lag 1
    assert digests["ppo"] == digests["decoupled"]
    assert stats["ppo"][metrics.STALENESS_MAX] == stats["decoupled"][metrics.STALENESS_MAX] == 1
    assert abs(stats["ppo"][metrics.RATIO_FIRST] - 1.0) > 1e-3  # the policy moved
    assert stats["decoupled"][metrics.RATIO_FIRST] == pytest.approx(1.0, abs=1e-5)
    assert stats["decoupled"][metrics.TIS_WEIGHT] == pytest.approx(expected_weight, abs=1e-5)
    assert expected_weight != pytest.approx(1.0, abs=1e-3)
