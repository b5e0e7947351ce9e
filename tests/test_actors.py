"""Tier 2: the PPO actors against a real local Ray and a tiny untrained model."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch

from jobs import cluster, rlhf
from jobs.ppo.loop import PPOLoop
from jobs.ppo.roles import policy_settings
from rlhf_ray.data.prepare import read_rows
from rlhf_ray.data.tokenizer import load_tokenizer
from rlhf_ray.errors import ResourceError, RoleFailed
from rlhf_ray.models.forward import response_logprobs
from rlhf_ray.models.loading import load_trainable_state
from rlhf_ray.models.sampling import decode_responses
from rlhf_ray.ppo.rollout_generator import build_policy
from rlhf_ray.run import metrics
from rlhf_ray.run.resources import PhaseResources, ppo_requests
from rlhf_ray.world.gold_judge import gold_reward
from tests.conftest import ROLE_TIMEOUT as TIMEOUT
from tests.conftest import ppo_loop, running_roles, smoke_config
from tests.held_prompts import closed_gate

# What a synced adapter carries beside its tensors' bytes: each tensor's name and metadata as
# pickled (measured: 10,396 bytes for the default preset's 28 tensors)
SYNC_BYTES_PER_NAME = 512


# Every role the tests below kill restarts (the scorer is killed 4 times), so the role set is
# started once for all of them: a role start costs ~15 s of CPU on 2 cores.
ROLE_RESTARTS = 8


def _config(out: Path, **overrides: str):
    """The shared roles' config (two generators; the learner takes batches up to two versions
    old, as the loops with overlap make them), with the loop's `overrides`."""
    shared = {"ppo.num_rollout_actors": "2", "ppo.max_role_restarts": str(ROLE_RESTARTS)}
    shared["ppo.max_policy_lag"] = "2"
    return smoke_config(out, **(shared | overrides))


def _loop(roles, prepared, **overrides: str) -> PPOLoop:
    """A new PPO loop (new prompt stream, step 0) driving the shared roles."""
    return ppo_loop(_config(roles.out, **overrides), roles, prepared)


@pytest.fixture(scope="module")
def roles(local_ray, tiny_run):
    """The four PPO roles with two generators, shared by this module's tests: each leaves them
    alive, with the generators holding the learner's weights (a step ends with the sync), except
    the last test, which kills the scorer for good."""
    out, _ = tiny_run
    with running_roles(_config(out), out) as started:
        yield started


def _learner_version(roles) -> int:
    return ray.get(roles.learner.weights(), timeout=TIMEOUT).version


def _check_version_zero(roles, out: Path) -> None:
    """Before any update the policy is the SFT model, so the reference's logprobs of a sampled
    batch are the generator's (KL ~0); the scorer scores it, the gold judge watching."""
    prompts = [read_rows(out / "data", "prompts")[0]["prompt"]] * 3  # one the judge knows
    batch_ref, _ = roles.generators[0].generate.remote(prompts, [0, 0, 0])
    ref_logprobs = ray.get(roles.reference.logprobs.remote(batch_ref), timeout=TIMEOUT)
    batch = ray.get(batch_ref, timeout=TIMEOUT)
    assert ref_logprobs.batch == batch.key
    torch.testing.assert_close(ref_logprobs.logprobs, batch.logprobs, atol=1e-4, rtol=0)
    scores = ray.get(roles.scorer.score.remote(batch_ref), timeout=TIMEOUT)
    assert scores.total.shape == (3,) and torch.isfinite(scores.total).all()
    # The gold judge watches (synthetic prompts) at weight 0: the total is the reward model's
    assert list(scores.components) == ["reward_model", "gold_judge"]
    assert torch.equal(scores.total, scores.components["reward_model"])
    texts = decode_responses(load_tokenizer(str(out / "sft")), batch)
    gold = gold_reward(prompts, texts)
    assert scores.components["gold_judge"].tolist() == pytest.approx(gold)


def test_two_generators_match_the_reference_at_version_zero_and_receive_synced_weights(
    roles, tiny_run
):
    out, prepared = tiny_run
    assert _learner_version(roles) == 0, "this test runs first, on roles that never trained"
    _check_version_zero(roles, out)
    loop = _loop(roles, prepared)
    pending = loop.queue.dispatch()
    batches = ray.get(pending.refs, timeout=TIMEOUT)
    # rollouts_per_step 8 over 2 generators: 4 rollouts each, sampled with version 0.
    assert [b.generator_rank for b in batches] == [0, 1]
    assert [b.response.shape[0] for b in batches] == [4, 4]
    assert all(b.policy_version == 0 for b in batches)
    assert all(b.response_mask[:, 0].all() for b in batches)  # every response has a token
    _, stats, times = loop.step(steps_left=1)
    assert stats[metrics.STALENESS_MAX] == 0
    assert set(times) == set(metrics.STAGES)
    after_sync = ray.get(next(iter(loop.queue)).refs[0], timeout=TIMEOUT)
    assert after_sync.policy_version == 1  # the learner's update reached the generators
    learner_weights = ray.get(roles.learner.weights(), timeout=TIMEOUT)
    assert learner_weights.version == 1
    assert all(name.count("lora_") == 1 for name in learner_weights.tensors)
    lora_b = [t for n, t in learner_weights.tensors.items() if "lora_B" in n]
    assert any(t.abs().sum() > 0 for t in lora_b)  # B starts at 0: it moved
    # adapter-only sync: the object every generator fetched is the LoRA tensors, plus the
    # pickled names and version around them
    adapter = sum(t.numel() * t.element_size() for t in learner_weights.tensors.values())
    print(f"sync: {stats[metrics.SYNC_BYTES]} bytes for an adapter of {adapter}")
    names = len(learner_weights.tensors)
    assert adapter <= stats[metrics.SYNC_BYTES] <= adapter + SYNC_BYTES_PER_NAME * names
    loop.step(steps_left=0)  # the batch in flight trains: the roles are left synced


def test_killed_rollout_generator_restarts_and_the_run_completes(roles, tiny_run, tmp_path):
    _, prepared = tiny_run
    generator = roles.generators[0]
    first_pid = ray.get(generator.ready.remote(), timeout=TIMEOUT)
    loop = _loop(roles, prepared)
    with closed_gate(tmp_path / "gate") as gate:
        loop.prompts.prompts = [gate.hold(p) for p in loop.prompts.prompts]
        pending = loop.queue.dispatch()
        gate.wait_entered(first_pid, TIMEOUT)  # the generator is inside generate, held there
        assert ray.wait(pending.refs[:1], timeout=0)[0] == []
        ray.kill(generator, no_restart=False)  # dies with its generate task in flight
    for step in range(1, 4):
        _, stats, _ = loop.step(steps_left=3 - step)
        assert stats[metrics.STALENESS_MAX] == 0
    assert ray.get(generator.ready.remote(), timeout=TIMEOUT) != first_pid
    _check_generators_sample_with_the_learners_weights(roles, prepared)


def _check_generators_sample_with_the_learners_weights(roles, prepared) -> None:
    """Each generator's sampling logprobs are those of a policy given the learner's current
    weights, and not the SFT model's (the reference's): the weights reached the sampler."""
    cfg = _config(roles.out)
    weights = ray.get(roles.learner.weights(), timeout=TIMEOUT)
    settings = replace(policy_settings(cfg, roles.out), cpus=torch.get_num_threads())
    _, policy = build_policy(settings)
    load_trainable_state(policy.eval(), weights.tensors)
    prompts = [read_rows(prepared.data_dir, "prompts")[0]["prompt"]] * 3
    for generator in roles.generators.values():
        batch_ref, _ = generator.generate.remote(prompts, [0, 0, 0])
        batch = ray.get(batch_ref, timeout=TIMEOUT)
        assert batch.policy_version == weights.version
        with torch.no_grad():
            learners = response_logprobs(
                policy,
                batch.query,
                batch.query_mask,
                batch.response,
                batch.response_mask,
                cfg.ppo.temperature,
            )
        torch.testing.assert_close(
            batch.logprobs, learners * batch.response_mask, atol=1e-4, rtol=0
        )
        sft = ray.get(roles.reference.logprobs.remote(batch_ref), timeout=TIMEOUT)
        assert not torch.allclose(batch.logprobs, sft.logprobs, atol=1e-3)


def test_killed_scorer_and_reference_restart_and_every_step_trains_once(roles, tiny_run):
    _, prepared = tiny_run
    loop = _loop(roles, prepared)
    pending = loop.queue.dispatch()
    # A call in flight when its actor dies is retried on the restarted actor.
    in_flight = roles.scorer.score.remote(pending.refs[0])
    ray.kill(roles.scorer, no_restart=False)
    rows = ray.get(pending.refs[0], timeout=TIMEOUT).response.shape[0]
    assert ray.get(in_flight, timeout=TIMEOUT).total.shape == (rows,)
    start, ledger = _learner_version(roles), []  # (step, learner versions gained after it)
    for step in range(1, 4):
        for role in (roles.scorer, roles.reference):
            ray.kill(role, no_restart=False)  # killed before every step's calls reach it
        loop.step(steps_left=3 - step)
        ledger.append((step, _learner_version(roles) - start))
    assert ledger == [(1, 1), (2, 2), (3, 3)]  # each step's batch trained once, none skipped


@pytest.mark.parametrize("lag", [1, 2])
def test_overlap_runs_the_generators_max_policy_lag_batches_ahead(roles, tiny_run, lag):
    """stale_batches wait: step 1 trains on rollouts of the learner's version and asks for `lag`
    batches before it updates; each later step asks for one more, behind the sync of the
    update before it, so from step lag + 1 on every batch is `lag` versions behind."""
    _, prepared = tiny_run
    overrides = {"ppo.overlap": "true", "ppo.max_policy_lag": str(lag)}
    loop = _loop(roles, prepared, **overrides)
    loop.queue.dispatch()
    lags, means, dropped = [], [], []
    for step in range(1, 5):
        _, stats, _ = loop.step(steps_left=4 - step)
        lags.append(stats[metrics.STALENESS_MAX])
        means.append(stats[metrics.STALENESS_MEAN])
        dropped.append(stats[metrics.DROPPED])
    assert lags == means == ([0, 1, 1, 1] if lag == 1 else [0, 1, 2, 2])
    assert dropped == [0, 0, 0, 0] and len(loop.queue) == 0  # no batch asked for beyond step 4


def test_stale_batches_drop_trains_on_the_newest_batch_and_counts_the_rows_dropped(roles, tiny_run):
    """stale_batches drop: a step trains on the newest sampled batch and drops the older ones;
    the generators are asked for another batch whenever they have none to sample, also while
    the learner updates. Three batches sampled before step 1: it trains on the third and drops
    two. Later drops depend on timing; what holds whatever the timing: no step trains on a
    batch more than max_policy_lag versions old, and every row asked for is trained on,
    dropped, or still queued at the end."""
    _, prepared = tiny_run
    overrides = {"ppo.overlap": "true", "ppo.max_policy_lag": "2", "ppo.stale_batches": "drop"}
    loop = _loop(roles, prepared, **overrides)
    rows = loop.ppo.rollouts_per_step
    first = [loop.queue.dispatch() for _ in range(3)]
    loop.queue.wait_all()
    trained, stats, _ = loop.step(steps_left=4)
    assert trained is first[2] and stats[metrics.DROPPED] == 2 * rows
    lags, dropped = [stats[metrics.STALENESS_MAX]], stats[metrics.DROPPED]
    for step in range(2, 6):
        _, stats, _ = loop.step(steps_left=5 - step)
        lags.append(stats[metrics.STALENESS_MAX])
        dropped += stats[metrics.DROPPED]
    print(f"lags {lags}, rows dropped {dropped}, batches asked for {loop.queue.asked}")
    assert lags[0] == 0 and all(0 <= lag <= 2 for lag in lags)
    assert dropped % rows == 0
    assert loop.queue.asked * rows == 5 * rows + dropped + len(loop.queue) * rows


def test_the_sync_after_an_overlapped_update_is_not_the_next_batchs_sampling(roles, tiny_run):
    """With overlap the next batch is sampled during the update, and a generator loads the new
    weights only once it is sampled (its calls run in order). A long sampling queued ahead of
    that batch (1024 rows on every generator) is time of the generate stage, not of the sync."""
    out, prepared = tiny_run
    loop = _loop(roles, prepared, **{"ppo.overlap": "true"})
    loop.queue.dispatch()
    dispatch, queued = loop.queue.dispatch, []
    prompts = [read_rows(out / "data", "prompts")[0]["prompt"]] * 1024

    def dispatch_behind_a_long_sampling():
        for generator in roles.generators.values():
            queued.append(generator.generate.remote(prompts, [0] * 1024)[1])
        return dispatch()

    loop.queue.dispatch = dispatch_behind_a_long_sampling
    _, _, times = loop.step(steps_left=1)
    loop.queue.dispatch = dispatch
    loop.step(steps_left=0)
    long_sampling = max(got["sample_seconds"] for got in ray.get(queued, timeout=TIMEOUT))
    print(f"sync {times['sync']:.3f}s beside a sampling of {long_sampling:.3f}s")
    assert times["sync"] < 0.25 * long_sampling, (times, long_sampling)


def test_a_role_that_stays_dead_is_named_in_the_error(roles, tiny_run):
    """Runs last: the scorer is killed for good (restarts left or not, Ray will not restart an
    actor killed with no_restart)."""
    _, prepared = tiny_run
    loop = _loop(roles, prepared)
    loop.queue.dispatch()
    ray.kill(roles.scorer, no_restart=True)
    start = time.time()
    with pytest.raises(RoleFailed, match="the learner update: the reward scorer failed"):
        loop.step(steps_left=0)
    assert time.time() - start < 60


def test_impossible_resource_fails_fast_naming_role_and_resource(local_ray, tmp_path, capsys):
    """`num_gpus: 1` on a CPU-only cluster: exit 2 with the role and resource, not a hang."""
    start = time.time()
    code = rlhf.main(
        ["--config", "smoke", "--output_dir", str(tmp_path), "--resources.learner_gpus", "1"]
    )
    assert code == 2
    assert time.time() - start < 30
    err = capsys.readouterr().err
    assert (
        "the PPO phase: the PPO learner asks for GPU=1 per replica, but the largest node has "
        "GPU=0" in err
    )
    assert not (tmp_path / "sft").exists()  # failed before any phase ran


def test_roles_that_fit_alone_but_not_together_are_refused(local_ray):
    cfg = smoke_config("unused", **{"resources.rollout_cpus": "1"})
    # 3 generators x 1 CPU + reward 0.25 + reference 0.25 + learner 0.25 = 3.75 > 2 CPUs.
    with pytest.raises(ResourceError, match=r"CPU=3\.75.*rollout generator 3x1.*cluster has CPU=2"):
        phase = PhaseResources("the PPO phase", ppo_requests(cfg.resources, 3), [])
        cluster.check_resources(phase, cluster.alive_nodes())
