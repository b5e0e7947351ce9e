"""The smoke PPO phase with `ppo.rollout_scaling auto` on a multi-node Ray on this machine
(`ray.cluster_utils.Cluster`): a node joins mid-run and a generator starts on it, then that node
is removed and the run goes on without it. Run by tests/test_scaling.py in its own process (the
test session already holds a Ray of its own):

    python -m tests.autoscale_scenario SOURCE_RUN WORK_DIR

The head node has no CPU; each worker node has 1 CPU, exactly what one generator asks for, and
the other roles ask for none. Prints one JSON line: the driver's exit code, the ledger's lines,
where the scenario added and removed the node, and the driver's output tails.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from rlhf_ray.run.ledger import RolloutLedger
from tests.cluster_scenario import start_driver
from tests.conftest import copy_outputs

STEPS = 60
DRIVER_ARGS = (
    *("--config", "smoke", "--phases", "ppo", "--ppo.steps", str(STEPS)),
    *("--ppo.checkpoint_every", "0", "--run.evaluate", "false"),
    *("--ppo.rollout_scaling", "auto", "--ppo.max_rollout_actors", "3"),
    *("--resources.rollout_cpus", "1", "--resources.learner_cpus", "0"),
    *("--resources.reward_cpus", "0", "--resources.reference_cpus", "0"),
)


def wait_for(condition, driver: threading.Thread, what: str) -> None:
    deadline = time.time() + 300
    while not condition():
        assert driver.is_alive(), f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def main(source: Path, work: Path) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    out = work / "auto"
    copy_outputs(source, out, ("base", "sft", "reward"))
    result: dict = {}
    driver, stdout, stderr = start_driver(["--output_dir", str(out), *DRIVER_ARGS], result)
    ledger = RolloutLedger(out)
    try:
        wait_for(lambda: len(ledger.read()) >= 2, driver, "step 2")
        joined = cluster.add_node(num_cpus=1)
        result["joined_after_step"] = len(ledger.read())
        wait_for(lambda: any(len(x["generators"]) == 2 for x in ledger.read()), driver, "growth")
        grown = len(ledger.read())
        wait_for(lambda: len(ledger.read()) >= grown + 2, driver, "two steps with two")
        cluster.remove_node(joined)
        result["removed_after_step"] = len(ledger.read())
    except AssertionError as err:
        result["scenario_error"] = str(err)
    driver.join(timeout=400)
    result.pop("ended_at", None)
    result["ledger"] = ledger.read()
    ray.shutdown()
    cluster.shutdown()
    return {**result, "stdout": stdout.getvalue()[-3000:], "stderr": stderr.getvalue()[-3000:]}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))), flush=True)
