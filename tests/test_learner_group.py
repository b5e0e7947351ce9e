"""The learner group: N PPOLearner ranks under DDP do the same update as one learner.

Each test trains one step's batches (several minibatches, two epochs) on a group of one rank and
on a group of two, on a real local Ray, and compares every trainable tensor of the policy and
the critic. Every batch statistic must be global for them to match: whitening the advantages
or the rewards per rank, a per-rank group baseline, a per-rank token mean of a loss each move
the weights by far more than the 1e-5 allowed (targets computed on each rank's half of the
batch, whitening included: 5.6e-3 for gae; the group as built: 6.8e-6, from the order of the
float sums in a full-parameter critic's Adam steps, and 1.5e-8 for the LoRA-only rloo, grpo).
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from contextlib import contextmanager

import pytest
import ray
import torch

from jobs.ppo.learner_group import (
    GroupCall,
    LearnerDied,
    LearnerGroup,
    learner_names,
    ranks_results,
)
from jobs.ppo.roles import learner_settings, policy_settings
from rlhf_ray.data.prepare import read_rows
from rlhf_ray.models.loading import FrozenModelSettings
from rlhf_ray.ppo.reference_model import ReferenceCore
from rlhf_ray.ppo.reward_scorer import ScorerCore
from rlhf_ray.ppo.rollout_generator import HFGeneratorCore
from rlhf_ray.ppo.settings import ScorerSettings
from rlhf_ray.run import metrics
from tests.conftest import raises_with, smoke_config

TIMEOUT = 120
TOLERANCE = 1e-5  # float32: the ranks sum the same terms in another order

# case -> overrides: GAE with a full-parameter critic and whitening (under DDP, and sharded
# by FSDP2); RLOO's group baseline; GRPO's per-response loss mean and its KL loss term
CASES = {
    "gae": {"ppo.estimator": "gae", "ppo.whiten_rewards": "true"},
    "gae-fsdp": {
        "ppo.estimator": "gae",
        "ppo.whiten_rewards": "true",
        "resources.learner_sharding": "fsdp",
    },
    "rloo": {"ppo.estimator": "rloo", "ppo.samples_per_prompt": "2"},
    "grpo": {"ppo.estimator": "grpo", "ppo.samples_per_prompt": "2"},
}


def _config(out, case: str, workers: int, max_lag: int):
    return smoke_config(
        out,
        **{
            **CASES[case],
            "ppo.rollouts_per_step": "8",
            "ppo.minibatch_size": "4",
            "ppo.epochs": "2",
            "ppo.max_policy_lag": str(max_lag),
            "resources.learner_workers": str(workers),
        },
    )


def _step_inputs(cfg, out, prepared) -> tuple[list[tuple], list]:
    """One step's rollouts from two generators' shards, scored and referenced, in the object
    store: (shards as (batch ref, reference-logprobs ref), [scores ref])."""
    policy = policy_settings(cfg, out)
    generator = HFGeneratorCore(policy, rank=0)
    generator.load_weights(_fresh_weights(cfg, out))
    k = cfg.ppo.samples_per_prompt
    prompts = [r["prompt"] for r in read_rows(prepared.data_dir, "prompts")][: 8 // k]
    rows = [p for p in prompts for _ in range(k)]
    group = [i for i in range(len(prompts)) for _ in range(k)]
    shards = [generator.generate(rows[:4], group[:4]), generator.generate(rows[4:], group[4:])]
    frozen = dict(model=cfg.model, quantization=cfg.quantization, cpus=1, gpus=0)
    reward_model = FrozenModelSettings(str(out / "reward"), **frozen)
    scorer = ScorerCore(ScorerSettings(reward_model, 1.0, (), (), str(out / "sft"), False))
    reference = ReferenceCore(FrozenModelSettings(str(out / "sft"), **frozen), policy.temperature)
    scores = ray.put(scorer.score(shards))
    refs = [ray.put(reference.logprobs(s)) for s in shards]
    return [(ray.put(s), r) for s, r in zip(shards, refs, strict=True)], [scores]


def _fresh_weights(cfg, out):
    from rlhf_ray.ppo.learner import LearnerCore

    return LearnerCore(learner_settings(cfg, out)).weights()


def _trained(group: LearnerGroup) -> dict[str, torch.Tensor]:
    """Every trainable tensor of the policy and the critic, by name."""
    tensors, _ = group.results(group.checkpoint_state(), "the learner's state")
    return {k: v for k, v in tensors.items() if k.startswith(("policy/", "critic/"))}


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def _started(tiny_run, case: str, counts: tuple[int, ...], max_lag: int = 1):
    """-> ({rank count: a learner group, started and joined}, one step's inputs); every group
    is stopped at the end. The inputs are sampled at version 0: a group trains on them again
    while its version is at most `max_lag` (ppo.max_policy_lag, only a bound without overlap)."""
    out, prepared = tiny_run
    configs = {n: _config(out, case, n, max_lag) for n in counts}
    inputs = _step_inputs(configs[counts[0]], out, prepared)
    groups = {n: LearnerGroup(cfg, learner_settings(cfg, out)) for n, cfg in configs.items()}
    try:
        for group in groups.values():
            group.results(GroupCall(group.ready()), "starting the learner ranks")
            group.connect()
        yield groups, inputs
    finally:
        for group in groups.values():
            group.stop()


@pytest.fixture(scope="module")
def one_and_two(request, tiny_run, local_ray):
    """Groups of one and two ranks of case `request.param` (indirect), started once for the
    tests of that case: starting three ranks and sampling a step's inputs took ~15 s of each
    test. pytest runs a case's tests together and stops its groups before the next case's
    start (their CPUs would not fit beside them). Either test works from whatever state the
    other left: both groups hold the same one after each. The checkpoint test trains the
    version-0 inputs at version 2 after the other test's update: hence max_lag 2."""
    with _started(tiny_run, request.param, (1, 2), max_lag=2) as started:
        yield started


@pytest.mark.parametrize("one_and_two", list(CASES), indirect=True)
def test_two_ranks_train_the_same_weights_as_one(one_and_two, request):
    case = request.node.callspec.params["one_and_two"]
    groups, (shards, scores) = one_and_two
    before = _trained(groups[1])
    assert _digest(before) == _digest(_trained(groups[2]))  # the same start
    stats = {
        n: group.results(group.train(shards, scores), "the update") for n, group in groups.items()
    }
    after = {n: _trained(group) for n, group in groups.items()}
    digests = [ray.get(r.trainable_digest.remote(), timeout=TIMEOUT) for r in groups[2].ranks]

    # every rank of the two holds exactly the same tensors after the update, except the shards
    # of a sharded critic (each rank its own half)
    assert digests[0]["policy"] == digests[1]["policy"]
    if "critic" in digests[0]:
        assert (digests[0]["critic"] == digests[1]["critic"]) == (case == "gae")
    assert set(after[1]) == set(after[2]) and any(k.startswith("critic/") for k in after[1]) == (
        case.startswith("gae")
    )
    moved = max((after[1][k] - before[k]).abs().max().item() for k in before)
    gaps = {k: (after[1][k] - after[2][k]).abs().max().item() for k in after[1]}
    worst = max(gaps, key=gaps.get)
    gap = gaps[worst]
    print(f"{case}: largest change {moved:.3e}, largest N=1 vs N=2 difference {gap:.3e} ({worst})")
    assert moved > 100 * TOLERANCE, "the update must move the weights for the test to mean much"
    assert gap <= TOLERANCE
    compared = (metrics.POLICY_LOSS, metrics.APPROXKL, metrics.CLIPFRAC, metrics.ENTROPY)
    # the update's diagnostics: maxima over both ranks' tokens, the whole gradient's norm
    compared += (metrics.LOGRATIO_MAX, metrics.APPROXKL_MAX, metrics.GRAD_NORM_MAX)
    for name in compared:
        assert stats[2][name] == pytest.approx(stats[1][name], rel=1e-4, abs=1e-6), name
    assert stats[2][metrics.KL] == stats[1][metrics.KL]  # from the same whole batch, not a slice


@pytest.mark.parametrize("one_and_two", ["rloo"], indirect=True)
def test_a_rank_killed_while_the_other_waits_in_a_collective_ends_the_update_naming_it(
    one_and_two,
):
    """SIGKILL rank 1 as the update starts: rank 0 waits for it in DDP's gradient all-reduce.
    The call ends at once (not after run.ray_timeout_s) with LearnerDied naming learner-1.
    It kills a rank of the rloo case's shared group of two: defined after the other rloo test,
    it is that group's last user."""
    groups, (shards, scores) = one_and_two
    group = groups[2]
    pids = group.results(GroupCall(group.ready(), combine=list), "the ranks' processes")
    update = group.train(shards, scores)
    os.kill(pids[1], signal.SIGKILL)
    started = time.monotonic()
    with raises_with("the update (learner-1)", exc=LearnerDied):
        group.results(update, "the update")
    took = time.monotonic() - started
    assert took < 10 < group.timeout, took
    assert group.dead() == ["learner-1"]


@ray.remote(num_cpus=0)
class _Rank:
    """A stand-in rank: its call fails as a rank's collective does when its peer is gone, or
    waits (as a rank stuck in the collective does) until it is killed."""

    def pid(self) -> int:
        return os.getpid()

    def fail(self, message: str):
        raise RuntimeError(message)

    def wait(self, seconds: float) -> str:
        time.sleep(seconds)
        return "done"


@pytest.mark.parametrize("rank_1_killed", [True, False])
def test_a_rank_that_fails_because_its_peer_died_is_reported_as_the_peer_dying(
    rank_1_killed, local_ray
):
    """Rank 0's call fails first (gloo's "Connection reset by peer"), rank 1's process is
    killed a second later: the call ends with LearnerDied naming learner-1, so the run rebuilds
    the group. Where rank 1 is alive and answers, rank 0's own error is the one raised."""
    ranks = [_Rank.remote(), _Rank.remote()]
    rank_1_seconds = 60 if rank_1_killed else 1  # killed after 1 s, or answers after 1 s
    pid = ray.get(ranks[1].pid.remote(), timeout=TIMEOUT)
    call = GroupCall(
        [
            ranks[0].fail.remote("Connection reset by peer"),
            ranks[1].wait.remote(rank_1_seconds),
        ]
    )
    if rank_1_killed:
        ray.wait(call.refs[:1], timeout=TIMEOUT)
        threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
        with raises_with("the update (learner-1)", exc=LearnerDied):
            ranks_results(call, learner_names(2), TIMEOUT, "the update")
    else:
        with raises_with("Connection reset by peer", exc=RuntimeError):
            ranks_results(call, learner_names(2), TIMEOUT, "the update")
    for rank in ranks:
        ray.kill(rank)


@pytest.mark.parametrize("one_and_two", ["gae", "gae-fsdp"], indirect=True)
def test_a_checkpoint_of_two_ranks_resumes_on_one_and_one_on_two(one_and_two):
    """A checkpoint holds the whole state (a sharded critic gathered): one of N ranks
    restores on M, a sharded critic cut into M shards again."""
    groups, (shards, scores) = one_and_two
    for source, target in ((2, 1), (1, 2)):
        group = groups[source]
        group.results(group.train(shards, scores), "the update")
        tensors, state = group.results(group.checkpoint_state(), "the learner's state")
        assert state["learner_workers"] == source
        before = _digest(_trained(groups[target]))
        groups[target].results(groups[target].restore(tensors, state), "restoring")
        restored = _digest(_trained(groups[target]))
        assert restored == _digest(_trained(group)) != before  # the target's own state replaced
        weights = ray.get(groups[target].weights(), timeout=TIMEOUT)
        assert weights.version == state["version"]
