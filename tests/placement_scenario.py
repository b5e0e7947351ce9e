"""What the driver's check of the cluster says before any work, in the process of
tests/cluster_scenario.py (a process of its own, with no Ray at first):

  refused_before_ray    no Ray yet and no RAY_ADDRESS: a train worker bigger than the local Ray
                        the run would start is refused before that Ray starts (the process holds
                        none afterwards) and before the data is prepared;
  placement_checks      on the scenario's cluster (a head with no CPU, two 1-CPU nodes), joined
                        through RAY_ADDRESS as a job is: groups with enough CPUs in total that Ray
                        cannot place are refused up front, naming the group; groups it can place
                        pass, and so does one it cannot place only while another job holds a node.

Each returns what the test asserts on: exit codes, the driver's output, seconds, what was written.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from jobs import cluster, placement, rlhf
from rlhf_ray.config import ResourcesConfig
from rlhf_ray.errors import ResourceError
from rlhf_ray.run.resources import (
    PhaseResources,
    ppo_groups,
    ppo_requests,
    training_groups,
    training_requests,
)

# Three 0.6-CPU train workers: CPU=1.8 of the cluster's 2, each fits a 1-CPU node, but no node
# holds two of them.
UNPACKABLE_TRAIN_WORKERS = (
    "--resources.train_workers",
    "3",
    "--resources.train_worker_cpus",
    "0.6",
)
SFT_ONLY = ("--config", "smoke", "--phases", "sft", "--run.evaluate", "false")


def run_driver(out: Path, *args: str) -> dict:
    """`python jobs/rlhf.py` in this process: its exit code, output, seconds and what it wrote."""
    stdout, stderr = io.StringIO(), io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = rlhf.main(["--output_dir", str(out), *args])
    return {
        "exit": code,
        "seconds": round(time.monotonic() - start, 1),
        "stdout": stdout.getvalue()[-3000:],
        "stderr": stderr.getvalue()[-3000:],
        "written": sorted(p.name for p in out.iterdir()) if out.is_dir() else [],
    }


def refused_before_ray(work: Path) -> dict:
    """A 3-CPU train worker on a local Ray of run.num_cpus 2, with no Ray in this process."""
    args = (*SFT_ONLY, "--run.num_cpus", "2", "--resources.train_worker_cpus", "3")
    refused = run_driver(work / "refused-local", *args)
    return {**refused, "ray_started": ray.is_initialized()}


def placement_checks(address: str, work: Path) -> dict:
    """The driver joins `address` (RAY_ADDRESS) and is refused; then the PPO groups are checked
    as the driver checks them. Leaves this process's Ray shut down and RAY_ADDRESS unset."""
    os.environ["RAY_ADDRESS"] = address
    try:
        checks = {"train": run_driver(work / "refused-train", *SFT_ONLY, *UNPACKABLE_TRAIN_WORKERS)}
        # Spread, the two 0.5-CPU learner ranks take half of each node: a 1-CPU scorer then fits
        # no node (packed, the ranks would leave it one).
        checks["ppo_spread"] = check_ppo(reward_cpus=1.0, rollout_cpus=0.0, reference_cpus=0.0)
        # ... where the other roles, smaller, fit in what the ranks leave.
        checks["ppo_fits"] = check_ppo(reward_cpus=0.5, rollout_cpus=0.25, reference_cpus=0.25)
        checks["busy"] = check_while_another_job_holds_a_node()
    finally:
        ray.shutdown()
        del os.environ["RAY_ADDRESS"]
    return checks


def check_while_another_job_holds_a_node() -> dict:
    """Two 0.6-CPU train workers, which fit the two nodes, while a group of another job holds
    one node's CPU: -> its error (None: not refused), what it printed, and seconds."""
    res = ResourcesConfig(train_workers=2, train_worker_cpus=0.6)
    phase = PhaseResources(
        "the SFT and reward phases", training_requests(res), training_groups(res)
    )
    other_job = placement_group([{"CPU": 1.0}])
    ray.get(other_job.ready(), timeout=60)
    waits, placement.WAIT_S = placement.WAIT_S, 1.0  # its wait for Ray's answer, shortened here
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            result = timed_check(phase)
    finally:
        placement.WAIT_S = waits
        remove_placement_group(other_job)
    return {**result, "stdout": printed.getvalue()}


def timed_check(phase: PhaseResources) -> dict:
    """The driver's check of `phase` on the live nodes: -> its error (None when it passed) and
    seconds."""
    start = time.monotonic()
    try:
        cluster.check_resources(phase, cluster.alive_nodes())
        error = None
    except ResourceError as err:
        error = str(err)
    return {"error": error, "seconds": round(time.monotonic() - start, 1)}


def check_ppo(**cpus: float) -> dict:
    """The PPO phase's check with two spread 0.5-CPU learner ranks, one generator and `cpus`:
    -> its error (None when it passed) and seconds."""
    res = ResourcesConfig(learner_workers=2, learner_cpus=0.5, learner_placement="spread", **cpus)
    return timed_check(PhaseResources("the PPO phase", ppo_requests(res, 1), ppo_groups(res, 1)))
