"""The vLLM rollout engine on CPU (vLLM's CPU build, in .venv-vllm: `make test-vllm`).

The engine's one job beyond sampling is to sample with the adapter it was last sent: each test
checks numbers, the sampler's logprobs against the learner's own forward pass of the same
version, not that a call returned.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest
import ray
import torch

from jobs.ppo.roles import engine_settings, policy_settings
from rlhf_ray.config.rollout import VLLM_CPU_HEAD_SIZES
from rlhf_ray.data.prepare import read_rows
from rlhf_ray.errors import ConfigError
from rlhf_ray.models.forward import response_logprobs
from rlhf_ray.models.loading import load_trainable_state
from rlhf_ray.ppo.learner import LearnerCore
from rlhf_ray.ppo.messages import ReferenceLogprobs, Scores
from rlhf_ray.ppo.settings import LearnerSettings
from rlhf_ray.ppo.vllm_generator import VllmGeneratorCore
from rlhf_ray.run import metrics
from tests.conftest import ROLE_TIMEOUT as TIMEOUT
from tests.conftest import make_tiny_run, ppo_loop, running_roles, smoke_config
from tests.held_prompts import closed_gate

pytestmark = [
    pytest.mark.vllm,
    # Deselected in .venv by pyproject's `-m "not vllm"`, which a `-m` of one's own replaces:
    # skipped where vLLM is not installed (where it is but fails to import, the tests fail)
    pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM not installed: make test-vllm"),
]

# The smoke model with heads of 32 dimensions (vLLM's CPU attention has no 16)
VLLM_MODEL = {"model.hidden_size": "64", "model.num_heads": "2", "rollout.engine": "vllm"}
# |sampler - learner| logprob of one token allowed: both run the same float32 model on the same
# CPU, with different kernels (measured: 5e-7 at most)
SAME_VERSION_ATOL = 1e-4


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("vllm-run"), **VLLM_MODEL)


def _config(out: Path, **overrides: str):
    return smoke_config(out, **{**VLLM_MODEL, **overrides})


def _learner_logprobs(learner: LearnerCore, batch) -> torch.Tensor:
    with torch.no_grad():
        logprobs = response_logprobs(
            learner.policy,
            batch.query,
            batch.query_mask,
            batch.response,
            batch.response_mask,
            learner.settings.policy.temperature,
        )
    return logprobs * batch.response_mask


def test_each_synced_adapter_version_is_the_one_that_samples(vllm_run):
    out, prepared = vllm_run
    cfg = _config(out)
    settings = policy_settings(cfg, out)
    learner = LearnerCore(
        LearnerSettings(settings, str(out / "reward"), "full", cfg.ppo, logprob_source="learner")
    )
    generator = VllmGeneratorCore(settings, engine_settings(cfg), rank=0)
    prompts = [r["prompt"] for r in read_rows(prepared.data_dir, "prompts")][:8]
    groups = list(range(len(prompts)))
    with pytest.raises(RuntimeError, match="no policy weights yet"):
        generator.generate(prompts, groups)

    generator.load_weights(learner.weights())
    rng = torch.get_rng_state()
    batch0 = generator.generate(prompts, groups)
    assert batch0.policy_version == 0
    _check_eos(batch0, generator.tok.eos_token_id, cfg.data.max_completion_tokens)
    torch.set_rng_state(rng)  # as a PPO checkpoint restores it: the same rollouts again
    again = generator.generate(prompts, groups)
    assert torch.equal(again.response, batch0.response)
    assert torch.equal(again.logprobs, batch0.logprobs)
    own0 = _learner_logprobs(learner, batch0)
    torch.testing.assert_close(batch0.logprobs, own0, atol=SAME_VERSION_ATOL, rtol=0)

    # One real update (the learner recomputes the old logprobs: the gap is its stat)
    scores = torch.linspace(-1, 1, len(prompts))
    ref = ReferenceLogprobs(batch0.key, own0.clone())  # the reference: the policy at version 0
    scored = Scores(scores, {"reward_model": scores}, [batch0.key])
    stats = learner.train([batch0], scored, [ref])
    assert stats[metrics.LOGPROB_GAP_MAX] < SAME_VERSION_ATOL
    assert stats[metrics.RATIO_FIRST] == pytest.approx(1.0, abs=1e-6)
    # ... and a large second one, so that the versions are far apart
    weights = learner.weights()
    for name, tensor in weights.tensors.items():
        if "lora_B" in name:
            tensor.add_(torch.randn_like(tensor) * 0.3)
    load_trainable_state(learner.policy, weights.tensors)
    assert learner.version == 1 == weights.version

    generator.load_weights(weights)
    generator.load_weights(weights)  # again (a load retried after a restart): kept as it is
    batch1 = generator.generate(prompts, groups)
    assert batch1.policy_version == 1
    own1 = _learner_logprobs(learner, batch1)
    torch.testing.assert_close(batch1.logprobs, own1, atol=SAME_VERSION_ATOL, rtol=0)
    # the same tokens under version 0 (the first update moved little; this one a lot)
    # (LoRA's B starts at zero: version 0's adapter)
    version0 = {n: torch.zeros_like(t) if "lora_B" in n else t for n, t in weights.tensors.items()}
    load_trainable_state(learner.policy, version0)
    stale = _learner_logprobs(learner, batch1)
    assert (stale - batch1.logprobs).abs().max() > 100 * SAME_VERSION_ATOL

    # the engine holds the newest adapter only; the older one's files are gone
    assert generator.llm.llm_engine.list_loras() == {2}
    assert [p.name for p in generator.adapters.iterdir()] == ["v1"]
    generator.close()
    assert not generator.adapters.exists()


def _trained_on_the_learners_own_logprobs(stats: dict) -> None:
    """A step on vLLM's batch: sampled by the learner's current version, whose logprobs the
    sampler's match, so the truncated importance weights are all ~1."""
    assert stats[metrics.STALENESS_MAX] == 0
    assert stats[metrics.LOGPROB_GAP_MEAN] <= stats[metrics.LOGPROB_GAP_MAX]
    assert stats[metrics.LOGPROB_GAP_MAX] < SAME_VERSION_ATOL
    assert stats[metrics.TIS_WEIGHT] == pytest.approx(1.0, abs=1e-3)
    assert stats[metrics.RATIO_FIRST] == pytest.approx(1.0, abs=1e-5)


def test_ppo_steps_on_vllm_with_tis_and_a_killed_generator_restarted_with_the_current_adapter(
    local_ray, vllm_run, tmp_path
):
    """Two PPO steps on vLLM rollouts (rollout.logprob_correction tis), the generator killed
    between them with the second batch in flight: the restarted engine loads the learner's
    adapter (version 1) before it samples the retried batch, so both steps train on batches of
    the learner's own version. (One set of roles for both: each vLLM engine start is ~15 s.)"""
    out, prepared = vllm_run
    cfg = _config(out, **{"ppo.steps": "2", "rollout.logprob_correction": "tis"})
    with running_roles(cfg, out) as roles:
        generator = roles.generators[0]
        first_pid = ray.get(generator.ready.remote(), timeout=TIMEOUT)
        loop = ppo_loop(cfg, roles, prepared)
        loop.queue.dispatch()
        with closed_gate(tmp_path / "gate") as gate:  # the version-1 batch is held in generate
            loop.prompts.prompts = [gate.hold(p) for p in loop.prompts.prompts]
            _, first, _ = loop.step(steps_left=1)  # trains version 1, syncs, dispatches
            gate.wait_entered(first_pid, TIMEOUT)
            assert ray.wait(next(iter(loop.queue)).refs[:1], timeout=0)[0] == []
            ray.kill(generator, no_restart=False)  # dies with the version-1 batch in flight
        _, second, _ = loop.step(steps_left=0)  # asked again, of the restarted one
        assert ray.get(generator.ready.remote(), timeout=TIMEOUT) != first_pid
        _trained_on_the_learners_own_logprobs(first)
        _trained_on_the_learners_own_logprobs(second)
        weights = ray.get(roles.learner.weights(), timeout=TIMEOUT)
        assert weights.version == 2
        assert second[metrics.SYNC_BYTES] >= _adapter_bytes(weights)


def _check_eos(batch, eos: int, max_tokens: int) -> None:
    """A row with EOS is masked up to and including it; one without used every token."""
    lengths = batch.response_mask.sum(1).long()
    for row, length in enumerate(lengths.tolist()):
        if batch.has_eos[row]:
            assert batch.response[row, length - 1] == eos
            assert (batch.response[row, : length - 1] != eos).all()
        else:
            assert length == max_tokens


def _adapter_bytes(weights) -> int:
    return sum(t.numel() * t.element_size() for t in weights.tensors.values())


def test_vllm_settings_the_engine_cannot_run_are_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="bitsandbytes 4-bit weights on GPUs only"):
        _config(tmp_path, **{"quantization.load_in_4bit": "true"})
    head_16 = {**VLLM_MODEL, "model.hidden_size": "32"}
    with pytest.raises(ConfigError, match="head size vLLM's CPU attention does not support"):
        smoke_config(tmp_path, **head_16)
    assert 16 not in VLLM_CPU_HEAD_SIZES
    with pytest.raises(ConfigError, match="less than resources.rollout_gpus=0.5"):
        _config(tmp_path, **{"resources.rollout_gpus": "0.5"})
    # auto picks vLLM only where the generators have GPUs; on CPUs it is a choice
    assert smoke_config(tmp_path).rollout_engine == "hf"
    assert _config(tmp_path).rollout_engine == "vllm"


def test_under_auto_a_generator_with_vllm_but_no_gpu_takes_hf_and_says_why():
    """pick_engine runs in the generator's process: vLLM installed here, but no CUDA GPU."""
    from actors.rollout_generator import pick_engine
    from rlhf_ray.config.rollout import RolloutConfig
    from rlhf_ray.ppo.settings import EngineSettings

    auto = EngineSettings(RolloutConfig(), 48, auto=True)
    assert pick_engine(auto) == ("hf", "no CUDA GPU is visible to this generator")
    assert pick_engine(EngineSettings(RolloutConfig(), 48)) == ("vllm", None)  # named: CPU build


CHUNK = 4  # tokens per chunk of the partial-rollout tests


def test_a_partial_rollout_goes_on_under_the_newer_adapter_with_each_tokens_version(vllm_run):
    """rollout.partial_chunk_tokens: weights handed over between chunks reach the rows being
    sampled. Each token carries the version that sampled it, and its sampler logprob is that
    version's own (the learner's forward pass of the same prefix under it)."""
    out, prepared = vllm_run
    cfg = _config(
        out,
        **{"rollout.partial_chunk_tokens": str(CHUNK), "ppo.overlap": "true"},
        **{"rollout.logprob_correction": "tis"},
    )
    settings = policy_settings(cfg, out)
    learner = LearnerCore(
        LearnerSettings(settings, str(out / "reward"), "full", cfg.ppo, logprob_source="learner")
    )
    generator = VllmGeneratorCore(settings, engine_settings(cfg), rank=0)
    generator.load_weights(learner.weights())
    version0 = {n: t.clone() for n, t in learner.weights().tensors.items()}
    newer = learner.weights()  # version 1: far from version 0
    newer.version = 1
    for name, tensor in newer.tensors.items():
        if "lora_B" in name:
            tensor.add_(torch.randn_like(tensor) * 0.3)
    asked = []

    def after_the_first_chunk(version: int):
        asked.append(version)
        return newer if len(asked) == 2 else None  # before the second chunk

    prompts = [r["prompt"] for r in read_rows(prepared.data_dir, "prompts")][:8]
    batch = generator.generate(prompts, list(range(len(prompts))), newer=after_the_first_chunk)
    assert asked[:2] == [0, 0] and set(asked[2:]) <= {1}  # asked before every chunk
    real = batch.response_mask > 0
    lengths = real.sum(1)
    assert (lengths > CHUNK).any(), "no row outlived the first chunk: nothing tested"
    expected = torch.where(torch.arange(real.shape[1]) < CHUNK, 0, 1).expand_as(real) * real
    assert torch.equal(batch.token_versions, expected)
    assert batch.policy_version == 0 and generator.version == 1
    _check_eos(batch, generator.tok.eos_token_id, cfg.data.max_completion_tokens)
    # each token's logprob: the version that sampled it
    load_trainable_state(learner.policy, version0)
    under0 = _learner_logprobs(learner, batch)
    load_trainable_state(learner.policy, newer.tensors)
    under1 = _learner_logprobs(learner, batch)
    own = torch.where(batch.token_versions == 1, under1, under0)
    torch.testing.assert_close(batch.logprobs, own, atol=SAME_VERSION_ATOL, rtol=0)
    later = batch.token_versions == 1
    assert (under0[later] - batch.logprobs[later]).abs().max() > 100 * SAME_VERSION_ATOL
    generator.close()


def test_ppo_with_partial_rollouts_posts_each_update_for_the_batches_in_flight(local_ray, vllm_run):
    """Three PPO steps with overlap and partial rollouts: each update is posted on the run's
    weights board instead of loaded behind the batch in flight, no step trains on a batch more
    than one version old, and evaluation samples with the step's weights."""
    out, prepared = vllm_run
    overrides = {"rollout.partial_chunk_tokens": str(CHUNK), "ppo.overlap": "true"}
    cfg = _config(out, **overrides, **{"ppo.steps": "3", "rollout.logprob_correction": "tis"})
    with running_roles(cfg, out) as roles:
        assert roles.board is not None
        loop = ppo_loop(cfg, roles, prepared)
        loop.queue.dispatch()
        sampled_with = []
        for step in range(1, 4):
            trained, stats, _ = loop.step(steps_left=3 - step)
            sampled_with.append(trained.version())
            assert stats[metrics.STALENESS_MAX] <= 1
            assert 0.0 <= stats[metrics.PARTIAL_TOKENS] <= 1.0
        # no weights were loaded behind a batch: the generator took each version off the board
        assert sampled_with[0] == 0 and sampled_with[2] >= 1, sampled_with
        asked = roles.generators[0].evaluate.remote(["a prompt"], 0)
        assert ray.get(asked, timeout=TIMEOUT).policy_version == 3  # the last step's, posted
