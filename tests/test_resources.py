"""Tests for rlhf_ray.run.resources: can the cluster ever run what the config asks for?

Nodes are plain dicts as in `ray.nodes()[i]["Resources"]`; no Ray is started. What Ray says of
the groups below on a cluster of several nodes: tests/test_multinode.py.
"""

import re

import pytest

from rlhf_ray.config import ResourcesConfig
from rlhf_ray.errors import ResourceError
from rlhf_ray.run.resources import (
    RoleRequest,
    bundle,
    check_fits,
    ppo_groups,
    ppo_requests,
    training_groups,
    training_requests,
)

CPU_NODE = {"CPU": 2.0, "memory": 8e9, "node:10.0.0.1": 1.0}
GPU_NODE = {"CPU": 4.0, "GPU": 1.0, "memory": 8e9}


def raises_with(*parts):
    pattern = "(?s)" + "".join(f"(?=.*{re.escape(str(p))})" for p in parts)
    return pytest.raises(ResourceError, match=pattern)


def test_bundle_leaves_out_zero_gpus():
    assert bundle(1.0, 0.0) == {"CPU": 1.0}
    assert bundle(0.5, 0.25) == {"CPU": 0.5, "GPU": 0.25}


def test_requests_from_config():
    res = ResourcesConfig(train_workers=3, train_worker_cpus=2.0, reward_gpus=0.5)
    assert training_requests(res) == [RoleRequest("train worker", 3, {"CPU": 2.0})]
    roles = ppo_requests(res, num_rollout_actors=2)
    assert [(r.role, r.count, r.bundle) for r in roles] == [
        ("rollout generator", 2, {"CPU": 1.0}),
        ("reward scorer", 1, {"CPU": 0.5, "GPU": 0.5}),
        ("reference model", 1, {"CPU": 0.5}),
        ("PPO learner", 1, {"CPU": 1.0}),
    ]


def test_fits_across_nodes_and_exactly_at_the_limit():
    requests = [
        RoleRequest("rollout generator", 2, {"CPU": 1.0}),
        RoleRequest("PPO learner", 1, {"CPU": 4.0, "GPU": 1.0}),
    ]
    # Largest node: CPU 4, GPU 1 >= every bundle. Totals: CPU 2*1 + 4 = 6 = 2 + 4, GPU 1 = 1.
    assert check_fits(requests, [CPU_NODE, GPU_NODE], "this run") is None  # no error


def test_fractions_summing_to_the_cluster_fit_despite_rounding():
    # 0.2 + 0.4 + 0.3 + 0.1 = 1 exactly, but 1.0000000000000002 when summed in floating point
    # in that order (rollout, reward, reference, learner); a 1-CPU node must still fit them.
    res = ResourcesConfig(
        rollout_cpus=0.2,
        reward_cpus=0.4,
        reference_cpus=0.3,
        learner_cpus=0.1,
        reward_gpus=0.5,
        reference_gpus=0.5,
    )
    assert 0.2 + 0.4 + 0.3 + 0.1 > 1.0
    assert check_fits(ppo_requests(res, 1), [{"CPU": 1.0, "GPU": 1.0}], "PPO") is None


def test_gpu_asked_on_cpu_only_nodes_names_role_and_gpu():
    requests = [RoleRequest("PPO learner", 1, bundle(1.0, 1.0))]
    with raises_with("PPO", "PPO learner", "GPU=1", "largest node has GPU=0", "resources."):
        check_fits(requests, [CPU_NODE, CPU_NODE], "PPO")


def test_bundle_bigger_than_any_node_but_not_the_cluster():
    # Two nodes of 2 CPUs: 4 in all, but a 3-CPU learner cannot be split across nodes.
    requests = [RoleRequest("PPO learner", 1, {"CPU": 3.0})]
    with raises_with("PPO learner", "CPU=3", "largest node has CPU=2"):
        check_fits(requests, [CPU_NODE, CPU_NODE], "PPO")


def test_total_over_the_cluster_lists_the_roles():
    requests = [
        RoleRequest("rollout generator", 2, {"CPU": 1.0}),
        RoleRequest("reward scorer", 1, {"CPU": 0.5}),
        RoleRequest("PPO learner", 1, {"CPU": 1.0}),
    ]
    # Each bundle fits one 2-CPU node, but together: 2*1 + 0.5 + 1 = 3.5 > 2.
    with raises_with(
        "PPO",
        "need CPU=3.5",
        "rollout generator 2x1",
        "reward scorer 1x0.5",
        "PPO learner 1x1",
        "cluster has CPU=2",
    ):
        check_fits(requests, [CPU_NODE], "PPO")


def test_total_gpus_over_the_cluster():
    # Two 1-GPU rollout generators and a 1-GPU learner on a single 1-GPU node: 3 > 1.
    requests = [
        RoleRequest("rollout generator", 2, {"CPU": 1.0, "GPU": 1.0}),
        RoleRequest("PPO learner", 1, {"CPU": 1.0, "GPU": 1.0}),
    ]
    with raises_with("need GPU=3", "rollout generator 2x1", "PPO learner 1x1", "cluster has GPU=1"):
        check_fits(requests, [GPU_NODE], "PPO")


def test_no_nodes_at_all():
    with raises_with("train worker", "CPU=1", "largest node has CPU=0"):
        check_fits(training_requests(ResourcesConfig()), [], "SFT")


# --- the groups Ray is asked to place (jobs/placement.py) -------------------------------------


def test_the_train_workers_are_one_pack_group_as_ray_train_places_them():
    [group] = training_groups(ResourcesConfig(train_workers=3, train_worker_cpus=0.6))
    assert (group.strategy, group.bundles()) == ("PACK", [{"CPU": 0.6}] * 3)
    assert group.describe() == "3 x train worker {CPU: 0.6}; strategy PACK"


def test_the_learner_group_keeps_its_strategy_and_the_other_roles_pack_beside_it():
    res = ResourcesConfig(
        learner_workers=2, learner_cpus=0.5, learner_placement="spread", reward_gpus=0.5
    )
    learner, others = ppo_groups(res, num_rollout_actors=2)
    assert (learner.strategy, learner.bundles()) == ("SPREAD", [{"CPU": 0.5}] * 2)
    assert learner.describe() == "2 x PPO learner {CPU: 0.5}; strategy SPREAD"
    assert others.strategy == "PACK"
    assert others.bundles() == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 0.5, "GPU": 0.5}, {"CPU": 0.5}]
    assert "resources.learner_placement=spread" in others.hint  # spread may be why it fails
    assert ppo_groups(ResourcesConfig(learner_workers=2), 1)[1].hint == ""


def test_a_role_that_asks_for_nothing_has_no_bundle():
    # Ray refuses a bundle of nothing, and a role asking for nothing fits any node
    res = ResourcesConfig(learner_cpus=0.0, reference_cpus=0.0, reward_cpus=0.0)
    learner, others = ppo_groups(res, num_rollout_actors=1)
    assert learner.bundles() == [] and others.bundles() == [{"CPU": 1.0}]
    assert others.describe() == "rollout generator {CPU: 1}; strategy PACK"
