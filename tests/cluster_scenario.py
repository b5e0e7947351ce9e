"""The smoke PPO phase on a multi-node Ray on this machine (`ray.cluster_utils.Cluster`), losing
the node that holds its rollout generator, twice. Run by tests/test_multinode.py in its own
process (the test session already holds a Ray of its own):

    python -m tests.cluster_scenario SOURCE_RUN WORK_DIR

The head node has no CPU, so only the driver and the roles asking for 0 CPUs live there; each
worker node has 1 CPU, exactly what the rollout generator asks for. Two runs, one cluster:
  lost   two worker nodes; the generator's node is removed at step 2 and the generator restarts
         on the spare one; that node is removed at step 4 and nothing can hold the generator;
  rerun  a node joins and the same command is run again.
Before them, the checks of tests/placement_scenario.py: a request refused before any Ray starts,
then on the two worker nodes groups Ray cannot place refused up front ("placement").
Prints one JSON line: per run, the driver's exit code, per removal the node removed and where
the generator lived afterwards, and the seconds from the last removal to the driver's exit.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import ray
import ray._private.state
from ray.cluster_utils import Cluster

from jobs import rlhf
from rlhf_ray.run.ppo_checkpoints import checkpoints_root, complete_steps
from tests.conftest import copy_outputs
from tests.placement_scenario import placement_checks, refused_before_ray

STEPS, REMOVE_AT_STEPS = 8, (2, 4)
DRIVER_ARGS = (
    *("--config", "smoke", "--phases", "ppo", "--ppo.steps", str(STEPS)),
    *("--ppo.checkpoint_every", "1", "--run.evaluate", "false"),
    *("--resources.rollout_cpus", "1", "--resources.learner_cpus", "0"),
    *("--resources.reward_cpus", "0", "--resources.reference_cpus", "0"),
)


def generator_node() -> str | None:
    """The node id of the live rollout generator, if it is alive."""
    for actor in ray._private.state.actors().values():
        if actor["Name"] == "rollout-0" and actor["State"] == "ALIVE":
            return actor["Address"]["NodeID"]
    return None


def start_driver(
    argv: list[str], result: dict
) -> tuple[threading.Thread, io.StringIO, io.StringIO]:
    """`python jobs/rlhf.py argv` in a thread of this process (on its Ray); the exit code (or
    "raised") and the end time go into `result`; -> the thread, its stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()

    def run() -> None:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                result["exit"] = rlhf.main(argv)
            except Exception:  # noqa: BLE001 - reported to the test, which shows the traceback
                result["exit"] = "raised"
                traceback.print_exc()
        result["ended_at"] = time.time()

    driver = threading.Thread(target=run, daemon=True)
    driver.start()
    return driver, stdout, stderr


def drive(cluster: Cluster, out: Path, remove_at_steps: tuple[int, ...] = ()) -> dict:
    """Run the driver in a thread; once each of `remove_at_steps` is saved, remove the node that
    holds the generator, and watch where the generator lives until the next removal."""
    result: dict = {"removals": []}
    driver, stdout, stderr = start_driver(["--output_dir", str(out), *DRIVER_ARGS], result)
    pending, removals, deadline = list(remove_at_steps), result["removals"], time.time() + 300
    while driver.is_alive():
        now = generator_node()
        if removals and now not in (None, removals[-1]["removed"]):  # where the restart landed
            removals[-1]["generator_node_after"] = now
        if pending and pending[0] in complete_steps(checkpoints_root(out)):
            assert now is not None, f"no live generator at step {pending[0]}"
            cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == now))
            removals.append({"step": pending.pop(0), "removed": now, "at": time.time()})
            removals[-1]["generator_node_after"] = None
        assert time.time() < deadline, f"the run did not end in 300 s ({pending} not reached)"
        time.sleep(0.1)
    driver.join(timeout=10)
    assert not pending, f"the run ended before steps {pending}: {stderr.getvalue()[-3000:]}"
    if removals:
        result["seconds_to_exit"] = round(result["ended_at"] - removals[-1]["at"], 1)
    return {**result, "stdout": stdout.getvalue()[-3000:], "stderr": stderr.getvalue()[-3000:]}


def main(source: Path, work: Path) -> dict:
    os.environ.pop("RAY_ADDRESS", None)  # the local Ray the refused run would start: none here
    checks = {"refused_before_ray": refused_before_ray(work)}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    checks["placement"] = placement_checks(cluster.address, work)
    ray.init(address=cluster.address, log_to_driver=False)
    out = work / "lost"
    copy_outputs(source, out, ("base", "sft", "reward"))
    runs = {**checks, "lost": drive(cluster, out, REMOVE_AT_STEPS)}
    cluster.add_node(num_cpus=1)
    # A rerun is a new driver: a new Ray job, whose actor names cannot clash with the old ones.
    ray.shutdown()
    ray.init(address=cluster.address, log_to_driver=False)
    runs["rerun"] = drive(cluster, out)
    ray.shutdown()
    cluster.shutdown()
    return runs


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))), flush=True)
