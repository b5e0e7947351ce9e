"""Tier 2: the PPO phase on several Ray nodes (one machine, `ray.cluster_utils.Cluster`) loses
the node that holds its rollout generator, twice in one run.

The first time a spare node is there: the generator restarts on it and the run goes on. The
second time there is none: the driver names the problem and exits 1 within seconds instead of
waiting on a restart that Ray can never place, and the same command run again once a node has
joined finishes the run. The scenario runs once, in its own process
(tests/cluster_scenario.py), since this session already holds a Ray.
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
