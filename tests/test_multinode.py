"""Tier 2: the PPO phase on several Ray nodes (one machine, `ray.cluster_utils.Cluster`) loses
the node that holds its rollout generator, twice in one run.

The first time a spare node is there: the generator restarts on it and the run goes on. The
second time there is none: the driver names the problem and exits 1 within seconds instead of
waiting on a restart that Ray can never place, and the same command run again once a node has
joined finishes the run. Before that run, the driver's check of the cluster: a request no node
of the local Ray could hold is refused before that Ray starts, and groups with CPUs enough in
total that Ray cannot place are refused up front, naming the group (tests/placement_scenario.py).
The scenario runs once, in its own process (tests/cluster_scenario.py), since this session
already holds a Ray.
"""

from __future__ import annotations

import re

import pytest

from rlhf_ray.run.checkpoints import read_metrics
from tests.cluster_scenario import REMOVE_AT_STEPS, STEPS
from tests.conftest import run_scenario

pytestmark = pytest.mark.slow  # a Ray cluster of its own (ray.cluster_utils.Cluster)


@pytest.fixture(scope="module")
def scenario(tiny_run, tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode")
    return run_scenario("cluster_scenario", str(tiny_run[0]), str(work)), work


def test_a_lost_generator_node_is_replaced_by_a_spare_one(scenario):
    runs, _ = scenario
    first = runs["lost"]["removals"][0]
    assert first["step"] == REMOVE_AT_STEPS[0]
    # the generator went on on the spare node, and steps were trained there up to the next loss
    assert first["generator_node_after"] not in (None, first["removed"]), runs["lost"]
    assert runs["lost"]["removals"][1]["removed"] == first["generator_node_after"]


def test_a_lost_node_with_no_spare_capacity_is_a_clear_error_in_seconds(scenario):
    runs, work = scenario
    lost = runs["lost"]
    assert lost["exit"] == 1, lost["stdout"] + lost["stderr"]
    assert "nodes left the cluster and the rest cannot hold the roles" in lost["stderr"]
    assert "the rollout generator asks for CPU=1" in lost["stderr"]
    assert lost["seconds_to_exit"] < 60, lost
    assert lost["removals"][-1]["generator_node_after"] is None  # nowhere to go


def test_the_same_command_finishes_the_run_once_a_node_has_joined(scenario):
    runs, work = scenario
    rerun = runs["rerun"]
    assert rerun["exit"] == 0, rerun["stderr"]
    resumed = re.search(r"\[ppo\] resuming after step (\d+)", rerun["stdout"])
    assert resumed and REMOVE_AT_STEPS[-1] <= int(resumed.group(1)) < STEPS, rerun["stdout"]
    assert read_metrics(work / "lost" / "policy")["steps"] == STEPS


# --- before any work: can the cluster hold the run? -------------------------------------------

WITHIN_S = 15  # "up front, within seconds": Ray answers in about 2 s (measured), CI is slower


def test_a_request_the_local_ray_cannot_hold_is_refused_before_it_starts(scenario):
    refused = scenario[0]["refused_before_ray"]
    assert refused["exit"] == 2, refused["stdout"] + refused["stderr"]
    assert not refused["ray_started"] and "Ray" not in refused["stdout"]
    err = refused["stderr"]
    assert "the train worker asks for CPU=3 per replica, but the largest node has CPU=2" in err
    assert "The local Ray this run starts has CPU=2 (run.num_cpus)" in err
    assert refused["written"] == []  # before the data was prepared: no DIR/data, no DIR/base


def test_workers_with_cpus_enough_in_total_that_ray_cannot_place_are_refused_up_front(scenario):
    train = scenario[0]["placement"]["train"]
    assert train["exit"] == 2, train["stdout"] + train["stderr"]
    assert "joined the Ray cluster at" in train["stdout"]  # RAY_ADDRESS: joined before the data
    err = train["stderr"]
    assert "the SFT and reward phases: Ray cannot place the Ray Train workers " in err
    assert "(3 x train worker {CPU: 0.6}; strategy PACK)" in err
    assert "({CPU: 1}; {CPU: 1}; {CPU: 0})" in err and "the cluster has CPU=2 in all" in err
    assert "resources.train_workers" in err
    assert train["seconds"] < WITHIN_S and train["written"] == []


def test_the_ppo_roles_are_placed_beside_the_learner_group_as_it_lies(scenario):
    checks = scenario[0]["placement"]
    spread = checks["ppo_spread"]
    assert spread["error"] is not None and spread["seconds"] < WITHIN_S, spread
    assert (
        "the PPO phase: Ray cannot place the other PPO roles (reward scorer {CPU: 1}; strategy "
        "PACK) beside the learner group (2 x PPO learner {CPU: 0.5}; strategy SPREAD)"
    ) in spread["error"]
    assert "resources.learner_placement=spread put the learner ranks" in spread["error"]
    assert checks["ppo_fits"]["error"] is None, checks["ppo_fits"]


def test_a_group_that_fits_but_not_while_another_job_holds_a_node_is_not_refused(scenario):
    busy = scenario[0]["placement"]["busy"]
    assert busy["error"] is None, busy
    assert (
        "[resources] the SFT and reward phases: Ray cannot place the Ray Train workers"
        in (busy["stdout"])
    )
    assert "(free: CPU=1). Not refused" in busy["stdout"]
