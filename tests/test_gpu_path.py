"""The GPU code paths on this CPU (marker gpu_path): every PPO role built with one GPU, on the
fake `cuda:0` of tests/fake_cuda.py, where an op mixing cuda and CPU tensors raises as on a GPU.

Each role's numbers on the fake device must equal the same role's on the CPU (the fake device
computes on the CPU underneath), so these tests check values, not only that nothing raised.
Autograd runs on the CPU tensors under the fake device's (tests/fake_cuda.py says why), so the
whole update, backward and optimizer step included, runs on cuda here.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch

import rlhf_ray.config
from actors.rollout_generator import pick_engine
from jobs.ppo.roles import Roles, engine_settings, policy_settings, record_engine_choices
from rlhf_ray.config.loading import load_config
from rlhf_ray.config.rollout import RolloutConfig, vllm_installed
from rlhf_ray.data.prepare import read_rows
from rlhf_ray.errors import ConfigError
from rlhf_ray.models.loading import FrozenModelSettings
from rlhf_ray.ppo.learner import LearnerCore
from rlhf_ray.ppo.messages import ReferenceLogprobs, Scores
from rlhf_ray.ppo.reference_model import ReferenceCore
from rlhf_ray.ppo.reward_scorer import ScorerCore
from rlhf_ray.ppo.rollout_generator import HFGeneratorCore
from rlhf_ray.ppo.settings import EngineSettings, LearnerSettings, ScorerSettings
from rlhf_ray.run import metrics
from rlhf_ray.run.ppo_checkpoints import read_checkpoint, write_checkpoint
from tests.conftest import raises_with, smoke_config
from tests.fake_cuda import CUDA, DeviceMixError, fake_cuda
from tests.first_step import DTYPES
from tests.first_step import first_step as run_first_step

pytestmark = pytest.mark.gpu_path
ESTIMATORS = ("gae", "rloo", "grpo", "reinforce++")


def test_the_fake_device_raises_on_a_device_mix_and_computes_real_values():
    with fake_cuda():
        x = torch.arange(4.0, device="cuda")
        assert x.device == CUDA and (x * 2).sum().item() == 12.0
        assert (x + torch.tensor(1.0)).device == CUDA  # a 0-dim CPU tensor may stand beside
        with pytest.raises(DeviceMixError, match="same device"):
            x + torch.zeros(4)
        with pytest.raises(DeviceMixError):
            torch.zeros(4).index_add_(0, torch.arange(4), x)
        assert x.cpu().device.type == "cpu" and x[1:].tolist() == [1.0, 2.0, 3.0]


@pytest.fixture(scope="module")
def rollouts(tiny_run):
    """(settings of a learner with one GPU, a CPU batch of 4 prompts x 2 samples, its scores
    and reference logprobs), sampled on the CPU: what a generator sends over the object store."""
    out, prepared = tiny_run
    cfg = smoke_config(out)
    policy = replace(policy_settings(cfg, out), cpus=1)
    ppo = replace(cfg.ppo, rollouts_per_step=8, minibatch_size=4, samples_per_prompt=2)
    settings = LearnerSettings(policy, str(out / "reward"), cfg.reward.method, ppo)
    generator = HFGeneratorCore(policy, rank=0)
    generator.load_weights(LearnerCore(settings).weights())
    prompts = [row["prompt"] for row in read_rows(prepared.data_dir, "prompts")][:4]
    batch = generator.generate([p for p in prompts for _ in range(2)], [0, 0, 1, 1, 2, 2, 3, 3])
    scores = Scores(torch.linspace(-1, 1, 8), {}, [batch.key])
    ref = ReferenceLogprobs(batch.key, batch.logprobs - 0.1 * batch.response_mask)
    return settings, batch, scores, ref


def on_gpu(settings: LearnerSettings, estimator: str = "gae") -> LearnerSettings:
    policy = replace(settings.policy, gpus=1)
    return replace(settings, policy=policy, ppo=replace(settings.ppo, estimator=estimator))


UPDATES = [(estimator, "sampler") for estimator in ESTIMATORS] + [("gae", "learner")]


@pytest.mark.parametrize(("estimator", "logprob_source"), UPDATES)
def test_one_update_of_every_estimator_on_cuda_equals_the_cpus(rollouts, estimator, logprob_source):
    """`LearnerCore.train` whole (the learner's own logprobs where asked, the critic's values,
    targets, epochs of minibatches, backward, clipping, AdamW) with the models on cuda and the
    step's batch, scores and reference logprobs from the object store on the CPU: the same
    statistics and the same weights after it as on the CPU."""
    settings, batch, scores, ref = rollouts
    settings = replace(on_gpu(settings, estimator), logprob_source=logprob_source)
    cpu = LearnerCore(settings)  # built outside fake_cuda: on the CPU
    expected = cpu.train([replace(batch)], scores, [ref])
    with fake_cuda():
        learner = LearnerCore(settings)
        assert next(learner.policy.parameters()).device == CUDA
        stats = learner.train([replace(batch)], scores, [ref])
        weights = learner.weights()
    assert stats.keys() == expected.keys()
    for name, value in expected.items():
        assert stats[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    for name, tensor in cpu.weights().tensors.items():
        torch.testing.assert_close(weights.tensors[name], tensor, atol=1e-6, rtol=1e-5)


def test_a_checkpoint_of_a_learner_on_cuda_is_read_where_there_is_no_gpu(rollouts, tmp_path):
    """Everything the learner sends the driver is on the CPU (the driver may run on a head
    with no GPU), and a learner on cuda restored from it holds the same weights and AdamW
    moments, back on cuda."""
    settings, batch, scores, ref = rollouts
    with fake_cuda():
        learner = LearnerCore(on_gpu(settings))
        learner.train([replace(batch)], scores, [ref])
        tensors, state = learner.checkpoint_state()
        on_gpu_tensors = [name for name, t in tensors.items() if t.device.type != "cpu"]
        assert on_gpu_tensors == []
        weights = learner.weights()
        assert all(t.device.type == "cpu" for t in weights.tensors.values())
    path = write_checkpoint(tmp_path, 1, tensors, state, keep=1)  # the driver: no GPU here
    saved, saved_state = read_checkpoint(path)
    with fake_cuda():
        restored = LearnerCore(on_gpu(settings))
        restored.restore(saved, saved_state)
        moments = restored.trained["policy"][1].state
        first = next(iter(moments.values()))
        assert first["exp_avg"].device == CUDA
        again, _ = restored.checkpoint_state()
    for name, tensor in tensors.items():
        if not name.startswith("rng/"):
            torch.testing.assert_close(again[name], tensor, atol=0, rtol=0)


def test_a_generator_on_cuda_loads_cpu_weights_and_samples_what_the_cpu_samples(rollouts):
    """Weights come from the object store on the CPU; the batch goes back on the CPU. With the
    same seed the fake device draws the same tokens as the CPU (one RNG underneath)."""
    settings, batch, *_ = rollouts
    policy = settings.policy
    weights = LearnerCore(settings).weights()
    prompts, group = batch.prompts[:4], batch.group[:4].tolist()
    cpu = HFGeneratorCore(policy, rank=0)
    cpu.load_weights(weights)
    expected = cpu.generate(prompts, group)
    with fake_cuda():
        generator = HFGeneratorCore(replace(policy, gpus=1), rank=0)
        generator.load_weights(weights)
        assert next(generator.policy.parameters()).device == CUDA
        sampled = generator.generate(prompts, group)
    assert sampled.response.device.type == "cpu" and sampled.logprobs.device.type == "cpu"
    assert torch.equal(sampled.response, expected.response)
    torch.testing.assert_close(sampled.logprobs, expected.logprobs, atol=1e-5, rtol=0)


def test_reference_and_reward_model_on_cuda_answer_on_the_cpu(tiny_run, rollouts):
    out, _ = tiny_run
    settings, batch, *_ = rollouts
    cfg = smoke_config(out)

    def roles(gpus: float):
        frozen = dict(model=cfg.model, quantization=cfg.quantization, cpus=1, gpus=gpus)
        reward = FrozenModelSettings(str(out / "reward"), **frozen)
        scorer = ScorerCore(ScorerSettings(reward, 1.0, (), (), str(out / "sft"), False))
        reference = ReferenceCore(FrozenModelSettings(str(out / "sft"), **frozen), 1.0)
        return reference.logprobs(batch).logprobs, scorer.score([batch]).total

    expected = roles(gpus=0)
    with fake_cuda():
        answers = roles(gpus=1)
    for got, want in zip(answers, expected, strict=True):
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# -- dtypes: bf16 and bitsandbytes 4-bit (nf4, bf16 compute) run on this CPU ------------------


@pytest.fixture(scope="module", params=list(DTYPES))
def first_step(request, tmp_path_factory):
    """(config, the numbers of PPO step 1 with the old logprobs from the learner, the same
    from the sampler): 16 rollouts, one minibatch (tests/first_step.py)."""
    out = tmp_path_factory.mktemp(f"dtype-{request.param}")
    cfg, _, stats = run_first_step(out, request.param, rollouts=16)
    for source, numbers in stats.items():
        print(request.param, source, {k: v for k, v in numbers.items() if "/" in k})
    return cfg, stats["learner"], stats["sampler"]


def test_kl_at_step_1_is_0_and_the_first_ratio_1_with_the_learners_logprobs(first_step):
    """Policy and reference are the same weights at step 1. With the old logprobs from the
    learner's pass (the default where the sampler computes otherwise) the reference computes
    the same thing: KL 0 (|KL| < 1e-6 per response) and ratio 1 (|ratio - 1| < 1e-6), in every
    dtype. 4-bit failed here before the reference was loaded as the policy is: KL 9.2e-4
    without its norms, embeddings and head in float32 (peft's k-bit preparation casts the
    policy's), 4.7e-4 in eval mode (bitsandbytes' CPU kernel differs from train mode's)."""
    _, learner, _ = first_step
    assert abs(learner[metrics.KL]) < 1e-6
    assert abs(learner[metrics.RATIO_FIRST] - 1) < 1e-6
    assert learner[metrics.APPROXKL] < 1e-12


def test_the_samplers_logprobs_are_off_by_what_the_default_source_says(first_step):
    """The gap between generate's incremental decode and the learner's full forward, measured
    on this model: ~1e-6 in float32 (so auto keeps the sampler's there), ~1e-3 in bf16 and
    4-bit (so auto takes the learner's). The sampler's KL and ratio are off by about as much."""
    cfg, learner, sampler = first_step
    gap = learner[metrics.LOGPROB_GAP_MAX]
    if cfg.model.dtype == "float32" and not cfg.quantization.load_in_4bit:
        assert gap < 1e-5 and cfg.logprob_source == "sampler"
    else:
        assert 1e-4 < gap < 1e-2 and cfg.logprob_source == "learner"
    assert metrics.LOGPROB_GAP_MAX not in sampler  # the sampler's used as they are
    assert abs(sampler[metrics.RATIO_FIRST] - 1) < gap


# -- settings that only matter on GPUs --------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "hint"),
    [
        ("learner_gpus", "2", "sit idle"),
        ("reference_gpus", "1.5", "at most 1"),
        ("rollout_gpus", "2", "raise ppo.num_rollout_actors"),
        ("train_worker_gpus", "4", "raise resources.train_workers"),
    ],
)
def test_more_than_one_gpu_per_role_is_refused_before_any_work(tmp_path, key, value, hint):
    """Each role runs on one device (device_map {"": current}, .to("cuda")): a second GPU was
    reserved and left idle. (vLLM tensor parallelism and the learner group are not built.)"""
    with raises_with(f"resources.{key}={float(value)}", hint, exc=ConfigError):
        smoke_config(tmp_path, **{f"resources.{key}": value})
    assert smoke_config(tmp_path, **{f"resources.{key}": "1"})


def test_rollout_engine_auto_on_gpus_is_decided_where_each_generator_runs(tmp_path):
    """The driver (often a CPU-only head) says "auto" whatever it has installed; each generator
    takes vLLM where it can run it, else hf, and says why (pick_engine, in its process)."""
    on_gpus = smoke_config(tmp_path, **{"resources.rollout_gpus": "1"})
    assert on_gpus.rollout_engine == "auto"
    assert engine_settings(on_gpus).auto  # the generators are told they may take vLLM
    # ... unless the config does not fit vLLM: then hf everywhere, said at start
    too_big = smoke_config(tmp_path, **{"resources.rollout_gpus": "1", "lora.r": "1024"})
    assert too_big.vllm_misfit() and engine_settings(too_big) is None
    assert pick_engine(None) == ("hf", None)
    if not vllm_installed():  # a node without vLLM (.venv-vllm: tests/test_vllm_engine.py)
        auto = EngineSettings(RolloutConfig(), 48, auto=True)
        assert pick_engine(auto) == ("hf", "vLLM is not installed on this node")
        with raises_with("rollout.engine vllm", "not installed", exc=RuntimeError):
            pick_engine(EngineSettings(RolloutConfig(), 48))


@ray.remote(num_cpus=0)
class _GeneratorThatChose:
    """Stands in for the RolloutGenerator actor's answer once pick_engine ran in it (a real actor of
    this session's Ray; a GPU node with vLLM is not to be had here)."""

    def __init__(self, choice: tuple[str, str | None]) -> None:
        self.choice = choice

    def engine_choice(self) -> tuple[str, str | None]:
        return self.choice


def test_what_each_generator_chose_is_said_and_kept(local_ray, tmp_path, capsys):
    cfg = smoke_config(tmp_path, **{"resources.rollout_gpus": "1"})
    generators = {
        0: _GeneratorThatChose.remote(("vllm", None)),
        2: _GeneratorThatChose.remote(("hf", "vLLM is not installed on this node")),
    }
    roles = Roles(None, None, None, generators, cfg, tmp_path)
    try:
        chosen = record_engine_choices(roles)
    finally:
        for actor in generators.values():
            ray.kill(actor)
    expected = {"rollout-0": "vllm", "rollout-2": "hf (vLLM is not installed on this node)"}
    assert chosen == expected
    assert json.loads((tmp_path / "rollout_engines.json").read_text()) == expected
    said = capsys.readouterr().out
    assert "[ppo] rollout.engine auto: rollout-0 vllm; rollout-2 hf (vLLM is not" in said


def test_the_7b_preset_recomputes_and_corrects_the_bf16_samplers_logprobs():
    """vLLM 0.32 has no bitsandbytes: it samples from a bf16 base while the learner trains the
    4-bit one. The preset takes the learner's logprobs, corrected by tis, and says so."""
    cfg = load_config("mistral-7b-qlora")
    assert cfg.rollout_engine == "vllm" and cfg.logprob_source == "learner"
    assert cfg.rollout.logprob_correction == "tis"
    presets = Path(rlhf_ray.config.__file__).parent / "presets"
    comment = (presets / "mistral-7b-qlora.yaml").read_text().split("model:")[0]
    assert "no bitsandbytes loading" in comment and "4-bit base stays in the engine" not in comment
