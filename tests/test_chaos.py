"""Tier 2: a PPO run (with overlap, two batches asked for ahead of the learner) whose stateless
roles are killed at random every few seconds finishes every step, trains each step once, on no
batch more than two versions old, and leaves no Ray resource held behind.

The driver runs in its own process, joined to the session's local Ray; a thread here SIGKILLs a
random rollout generator, reward scorer or reference model process of this session's Ray once
the last victim's replacement is up and the run has trained KILL_EVERY_STEPS more steps, until
the driver exits: about one kill per three steps whatever the machine's speed. (Kills timed by
the clock, a second after each replacement, gave an 18-step run 2 to 5 kills as a smoke step
took 0.1-0.5 s, and 10 to 13 with half a second.) A restart (a new process importing torch,
loading the model) takes about 8 seconds on the 2-core machine.
"""

from __future__ import annotations

import random
import threading
import time

import psutil
import pytest
import ray
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf_ray.run import metrics
from rlhf_ray.run.checkpoints import read_metrics
from rlhf_ray.run.trackers import read_metrics_log
from tests.conftest import copy_outputs, finish, session_ray_processes, start_driver

pytestmark = pytest.mark.slow  # a driver in its own process

STEPS, KILL_EVERY_STEPS = 18, 3
STATELESS = ("ray::RolloutGenerator", "ray::RewardScorer", "ray::ReferenceModel")


def _steps_trained(out) -> int:
    return sum(metrics.KL in row for row in read_metrics_log(out, "ppo"))


def _kill_at_random(driver, out, killed: list[str], rng: random.Random) -> None:
    """With all three stateless roles up and KILL_EVERY_STEPS steps trained since the last kill,
    SIGKILL one of them.

    Waiting for the last victim's replacement keeps the run moving on a 2-core machine, where a
    restart (a new process importing torch and loading the model) takes several seconds.
    """
    last_kill_at = 0
    while driver.poll() is None:
        time.sleep(0.1)
        if _steps_trained(out) < last_kill_at + KILL_EVERY_STEPS:
            continue
        victims = session_ray_processes(*STATELESS)
        if len(victims) < len(STATELESS) or driver.poll() is not None:
            continue  # a restart is still under way
        victim = rng.choice(victims)
        try:
            role = victim.cmdline()[0].split(".")[0].strip()
            victim.kill()
        except psutil.NoSuchProcess:
            continue
        killed.append(role)
        last_kill_at = _steps_trained(out)


def _resources_back_to(before: dict, seconds: float) -> tuple[bool, dict]:
    """(whether every resource Ray had free before the run is free again, what is available),
    waiting up to `seconds` for Ray to take back what the driver's actors held. Compared with
    what was free before the run rather than the total: earlier tests may have left Ray's own
    long-lived actors (Ray Train's state actor holds 0.001 of the head node's resource). At
    least as much, not exactly as much: an earlier test's actors may still have been being
    released when `before` was read (measured: 1.25 CPUs free before, 2.0 after)."""
    deadline = time.time() + seconds
    while True:
        available = ray.available_resources()
        released = all(available.get(k, 0.0) >= before[k] - 1e-6 for k in before)
        if released or time.time() > deadline:
            return released, available
        time.sleep(0.5)


def test_random_kills_of_stateless_roles_lose_no_step_and_leak_nothing(
    local_ray, tiny_run, tmp_path
):
    out = tmp_path / "chaos"
    copy_outputs(tiny_run[0], out, ("base", "sft", "reward"))
    free_before = ray.available_resources()
    driver = start_driver(
        out,
        *("--phases", "ppo", "--ppo.steps", str(STEPS), "--ppo.checkpoint_every", "6"),
        *("--ppo.max_role_restarts", "1000", "--run.evaluate", "false"),
        # two batches asked for ahead of the learner: a killed generator loses both its calls
        *("--ppo.overlap", "true", "--ppo.max_policy_lag", "2"),
    )
    killed: list[str] = []
    chaos = threading.Thread(target=_kill_at_random, args=(driver, out, killed, random.Random(0)))
    chaos.start()
    code = finish(driver, timeout=600)
    chaos.join()
    print(f"{len(killed)} kills: {killed}")
    log = (tmp_path / "chaos.log").read_text()
    assert code == 0, log[-3000:]
    assert len(killed) >= 3, killed  # the faults really happened, of more than one role
    assert len(set(killed)) >= 2, killed

    assert read_metrics(out / "policy")["steps"] == STEPS
    events = EventAccumulator(str(out / "tb" / "ppo"))
    events.Reload()
    steps = [e.step for e in events.Scalars(metrics.KL)]
    assert steps == list(range(1, STEPS + 1))  # every step trained, each once
    lags = [e.value for e in events.Scalars(metrics.STALENESS_MAX)]
    assert max(lags) <= 2 and lags[:2] == [0, 1], lags  # a restarted one samples newer weights

    released, available = _resources_back_to(free_before, 60)
    assert released, (available, free_before)
