"""The PPO phase's and the rollout engine's settings: each estimator's KL placement, settings
named when nothing uses them, asynchronous sampling (overlap, staleness, partial rollouts), and
what vLLM cannot do, refused before any work. Each error names the key, the value and what is
allowed (tests/test_config.py: the loader and the command line)."""

from __future__ import annotations

from rlhf_ray.config import PPOConfig
from rlhf_ray.errors import ConfigError
from tests import conftest
from tests.conftest import smoke_config


def raises_with(*parts, exc=ConfigError):
    return conftest.raises_with(*parts, exc=exc)


def test_estimator_settings_and_where_each_puts_the_kl():
    """`auto` follows each paper: GRPO puts the KL in the loss, the others in the reward."""
    placement = {}
    for estimator in ("gae", "rloo", "grpo", "reinforce++"):
        ppo = PPOConfig(estimator=estimator, samples_per_prompt=4)
        placement[estimator] = "loss" if ppo.kl_in_loss else "reward"
        assert ppo.uses_critic == (estimator == "gae")
        assert ppo.prompts_per_step == 16  # 64 rollouts / 4 samples
    assert placement == {"gae": "reward", "rloo": "reward", "grpo": "loss", "reinforce++": "reward"}
    assert not PPOConfig(estimator="grpo", samples_per_prompt=2, kl_placement="reward").kl_in_loss
    assert PPOConfig(kl_placement="loss").kl_in_loss


def test_settings_an_estimator_does_not_use_are_named_when_changed():
    assert PPOConfig(estimator="rloo", samples_per_prompt=2).unused_settings() == []
    changed = PPOConfig(estimator="grpo", samples_per_prompt=2, critic_lr=0.01, gamma=0.9)
    assert changed.unused_settings() == ["ppo.critic_lr=0.01", "ppo.gamma=0.9"]
    assert PPOConfig(estimator="reinforce++", gamma=0.9).unused_settings() == []  # it discounts
    assert PPOConfig(critic_lr=0.01, lam=0.9).unused_settings() == []  # gae uses them all


def test_the_decoupled_objective_is_named_unused_without_overlap():
    """Only overlap makes a batch lag; at lag 0 the decoupled objective is PPO."""
    assert PPOConfig(objective="decoupled").unused_settings() == ["ppo.objective=decoupled"]
    assert PPOConfig(objective="decoupled", overlap=True).unused_settings() == []
    with raises_with("ppo.objective='aReaL'", "one of ppo, decoupled"):
        PPOConfig(objective="aReaL")


def test_auto_scaling_bounds_are_checked_and_unused_without_it():
    with raises_with("ppo.rollout_scaling='elastic'", "one of fixed, auto"):
        PPOConfig(rollout_scaling="elastic")
    with raises_with("ppo.max_rollout_actors=2", ">= min_rollout_actors=3"):
        PPOConfig(rollout_scaling="auto", min_rollout_actors=3, max_rollout_actors=2)
    with raises_with("ppo.num_rollout_actors=5", "within min_rollout_actors=1", "auto"):
        PPOConfig(rollout_scaling="auto", num_rollout_actors=5, max_rollout_actors=4)
    assert PPOConfig(num_rollout_actors=5, max_rollout_actors=4).num_rollout_actors == 5  # fixed
    assert PPOConfig(max_rollout_actors=4).unused_settings() == ["ppo.max_rollout_actors=4"]
    assert PPOConfig(rollout_scaling="auto", max_rollout_actors=4).unused_settings() == []


def test_rollout_settings_are_checked(tmp_path):
    with raises_with("rollout.tis_cap=0.5", ">= 1"):
        smoke_config(tmp_path, **{"rollout.tis_cap": "0.5"})
    with raises_with("rollout.engine='fast'", "one of auto, hf, vllm"):
        smoke_config(tmp_path, **{"rollout.engine": "fast"})
    assert smoke_config(tmp_path).rollout_engine == "hf"  # CPU generators: hf, installed or not
    # a config naming vLLM is valid (and can be shown) where vLLM is not installed
    named = {"rollout.engine": "vllm", "model.hidden_size": "64", "model.num_heads": "2"}
    assert smoke_config(tmp_path, **named).rollout.engine == "vllm"


def test_vllm_settings_that_cannot_work_are_refused_before_any_work(tmp_path):
    heads_of_32 = {"model.hidden_size": "64", "model.num_heads": "2", "rollout.engine": "vllm"}

    def vllm(**more: str):
        return smoke_config(tmp_path, **heads_of_32, **more)

    with raises_with("ppo.overlap", "rollout.logprob_correction tis"):
        vllm(**{"ppo.overlap": "true"})
    assert vllm(**{"ppo.overlap": "true", "rollout.logprob_correction": "tis"}).ppo.overlap
    with raises_with("rollout.max_model_len=40", "at least 48"):  # smoke: 32 + 16 tokens
        vllm(**{"rollout.max_model_len": "40"})
    with raises_with("rollout.gpu_memory_utilization=0.5", "less than resources.rollout_gpus"):
        vllm(**{"resources.rollout_gpus": "0.5", "rollout.gpu_memory_utilization": "0.5"})
    with raises_with("lora.r=1024", "at most 512"):
        vllm(**{"lora.r": "1024"})
    with raises_with("rollout.logprob_source='sampler'", "expected auto or learner"):
        vllm(**{"rollout.logprob_source": "sampler"})
    # vLLM-only settings with the hf engine are named, not dropped silently
    hf = smoke_config(tmp_path, **{"rollout.max_model_len": "64"})
    assert hf.rollout.unused_settings(hf.rollout_engine) == [
        "rollout.max_model_len=64 (rollout engine hf)"
    ]


def test_old_logprobs_come_from_the_learner_where_the_sampler_computes_otherwise(tmp_path):
    """auto: the sampler's own in float32 with hf (measured gap ~1e-6), the learner's with a
    bf16 or 4-bit policy (~1e-3) or vLLM; tis needs them from the learner (else every weight
    is 1), and so does overlap with them from the learner (the lag of one version)."""
    assert smoke_config(tmp_path).logprob_source == "sampler"
    assert smoke_config(tmp_path, **{"model.dtype": "bfloat16"}).logprob_source == "learner"
    four_bit = {"quantization.load_in_4bit": "true", "model.hidden_size": "64"}
    four_bit |= {"sft.method": "lora", "reward.method": "lora"}
    assert smoke_config(tmp_path, **four_bit).logprob_source == "learner"
    learner = smoke_config(tmp_path, **{"rollout.logprob_source": "learner"})
    assert learner.logprob_source == "learner"
    with raises_with("rollout.logprob_correction='tis'", "rollout.logprob_source sampler"):
        smoke_config(tmp_path, **{"rollout.logprob_correction": "tis"})
    tis = {"rollout.logprob_source": "learner", "rollout.logprob_correction": "tis"}
    assert smoke_config(tmp_path, **tis).rollout.logprob_correction == "tis"
    with raises_with("ppo.overlap", "expected rollout.logprob_correction tis"):
        smoke_config(tmp_path, **{"ppo.overlap": "true", "model.dtype": "bfloat16"})
    assert smoke_config(tmp_path, **{"ppo.overlap": "true"}).ppo.overlap  # float32: sampler


def test_the_staleness_settings_are_named_unused_without_overlap():
    """Without overlap no batch lags: k and what to do with stale batches do nothing."""
    quiet = PPOConfig(max_policy_lag=2, stale_batches="drop")
    assert quiet.unused_settings() == ["ppo.max_policy_lag=2", "ppo.stale_batches=drop"]
    assert PPOConfig(max_policy_lag=2, stale_batches="drop", overlap=True).unused_settings() == []
    with raises_with("ppo.stale_batches='skip'", "one of wait, drop"):
        PPOConfig(stale_batches="skip")


def test_partial_rollouts_need_overlap_and_are_named_unused_with_hf(tmp_path):
    """rollout.partial_chunk_tokens: an update can only reach a batch being sampled when the
    batches are sampled during updates; Hugging Face generate samples whole batches."""
    with raises_with("rollout.partial_chunk_tokens=8 without ppo.overlap", "set ppo.overlap"):
        smoke_config(tmp_path, **{"rollout.partial_chunk_tokens": "8"})
    with raises_with("rollout.partial_chunk_tokens=-1", "expected"):
        smoke_config(tmp_path, **{"rollout.partial_chunk_tokens": "-1"})
    cfg = smoke_config(tmp_path, **{"rollout.partial_chunk_tokens": "8", "ppo.overlap": "true"})
    assert cfg.rollout.unused_settings("hf") == [
        "rollout.partial_chunk_tokens=8 (rollout engine hf)"
    ]
