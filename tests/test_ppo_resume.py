"""Tier 2: a PPO phase (with `ppo.overlap` and `ppo.max_policy_lag 2`: two batches are always in
flight, trained on two versions behind by the decoupled objective) stopped by SIGTERM, its rerun
SIGKILLed, and its second rerun losing one
learner rank (every role rebuilt from its checkpoint), equals one never stopped. The learner is a
group of two ranks: the LoRA policy under DDP and the full-parameter critic sharded over them by
FSDP2, so a checkpoint holds the gathered shards and each rank's RNG; one rank is the same code
with a group of one (restores across rank counts and shardings: tests/test_learner_group.py; one
rank through `ray job stop` and a resubmit: tests/test_e2e.py).

Each run is the real driver (`python jobs/rlhf.py --phases ppo`) in its own process, joined to
the session's local Ray, on the tiny run's untrained SFT and reward models. Compared with the
uninterrupted run: every per-step metric TensorBoard shows (wall-clock figures aside), each
step exactly once, and the exported policy's weights, bit for bit (CPU, fp32).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf_ray.run import metrics
from rlhf_ray.run.ppo_checkpoints import complete_steps
from tests.conftest import copy_outputs, finish, session_ray_processes, start_driver

pytestmark = pytest.mark.slow  # a driver in its own process

STEPS = 8  # three faults, each once a step is saved: later steps leave room for the next
TIMEOUT = 300
DRIVER_ARGS = (
    *("--phases", "ppo", "--ppo.steps", str(STEPS), "--ppo.checkpoint_every", "1"),
    *("--ppo.overlap", "true"),  # every checkpoint then holds two batches asked for ahead,
    *("--ppo.max_policy_lag", "2"),  # sampled one and two versions behind the learner
    *("--ppo.objective", "decoupled"),  # trained on around the proximal policy, weighed
    *("--run.evaluate", "false"),  # compared by their metrics and weights, not the gold judge
    *("--resources.learner_workers", "2", "--resources.learner_sharding", "fsdp"),
)
# Differ between runs by nature: wall-clock figures, and the synced object's size (the pickled
# tensors of a restored learner took 2 bytes more in one run)
WALL_CLOCK = ("time/", "roles/", metrics.TOKENS_PER_S, metrics.SYNC_BYTES)


def _run_dir(tmp_path: Path, tiny_run, name: str) -> Path:
    """An output directory holding the tiny run's base model and complete SFT and reward phases."""
    out = tmp_path / name
    copy_outputs(tiny_run[0], out, ("base", "sft", "reward"))
    return out


def _wait_for_checkpoint(out: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.time() + TIMEOUT
    while step not in complete_steps(out / "ppo_checkpoints"):
        assert process.poll() is None, f"the driver exited with {process.returncode} before"
        assert time.time() < deadline, f"no checkpoint of step {step} within {TIMEOUT}s"
        time.sleep(0.05)


def _per_step_metrics(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] as TensorBoard shows them (a resume's purge applied)."""
    events = EventAccumulator(str(out / "tb" / "ppo"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if not tag.startswith(WALL_CLOCK) and not tag.endswith("/completions_per_s")
    }


def _policy_weights(out: Path) -> dict:
    return load_file(out / "policy" / "model.safetensors")


def _assert_same_run(out: Path, never_stopped: Path) -> None:
    expected_metrics = _per_step_metrics(never_stopped)
    got = _per_step_metrics(out)
    assert got.keys() == expected_metrics.keys()
    assert [step for step, _ in got[metrics.KL]] == list(range(1, STEPS + 1))  # each step once
    for tag, points in got.items():  # (the decoupled objective's weights from step 2 on)
        assert points == expected_metrics[tag], tag
    weights, expected_weights = _policy_weights(out), _policy_weights(never_stopped)
    assert weights.keys() == expected_weights.keys()
    for name, tensor in weights.items():
        assert tensor.equal(expected_weights[name]), name


def _log(tmp_path: Path) -> str:
    return (tmp_path / "stopped.log").read_text()


def _until_saved(out: Path, step: int) -> subprocess.Popen:
    """The driver started on `out` (the same command every time), once `step` is saved."""
    driver = start_driver(out, *DRIVER_ARGS)
    _wait_for_checkpoint(out, step, driver)
    return driver


def _last_saved(out: Path, tmp_path: Path) -> int:
    """The newest complete checkpoint, which must leave steps for the next fault."""
    saved = max(complete_steps(out / "ppo_checkpoints"))
    assert saved <= STEPS - 3, _log(tmp_path)[-3000:]
    assert not (out / "policy").exists()
    return saved


def test_a_stopped_run_then_a_killed_driver_then_a_killed_learner_rank_end_as_one_never_stopped(
    local_ray, tiny_run, tmp_path
):
    never_stopped = _run_dir(tmp_path, tiny_run, "uninterrupted")
    code = finish(start_driver(never_stopped, *DRIVER_ARGS))
    assert code == 0, (tmp_path / "uninterrupted.log").read_text()[-3000:]
    # steps 2.. trained on batches a version behind, 3.. two, weighed by the decoupled objective
    trained = _per_step_metrics(never_stopped)
    assert [step for step, _ in trained[metrics.TIS_WEIGHT]] == list(range(2, STEPS + 1))
    assert [lag for _, lag in trained[metrics.STALENESS_MAX]] == [0, 1] + [2] * (STEPS - 2)
    out = _run_dir(tmp_path, tiny_run, "stopped")

    # 1. SIGTERM (`ray job stop`): the step in progress and the batches in flight are saved.
    first = _until_saved(out, 2)
    first.send_signal(signal.SIGTERM)
    assert finish(first) == 143, _log(tmp_path)[-3000:]
    assert "Run the same command again to continue" in _log(tmp_path)
    stopped_at = _last_saved(out, tmp_path)

    # 2. The same command, SIGKILLed once it has saved a step of its own.
    second = _until_saved(out, stopped_at + 1)
    second.kill()
    assert finish(second) == -signal.SIGKILL
    killed_at = _last_saved(out, tmp_path)

    # 3. Once more; one of its learner ranks is SIGKILLed (the process and everything it held
    # are gone) once it has saved a step, while the other may wait for it in a collective; every
    # role is rebuilt from the newest checkpoint.
    third = _until_saved(out, killed_at + 1)
    learners = session_ray_processes("ray::PPOLearner")
    assert len(learners) == 2
    learners[-1].kill()
    assert finish(third) == 0, _log(tmp_path)[-3000:]
    log = _log(tmp_path)
    for resumed_at in (stopped_at, killed_at):
        assert f"[ppo] resuming after step {resumed_at}" in log
    assert "PPOLearner" in log and "[ppo] rebuilding every role from" in log
    assert "1 of ppo.max_learner_restarts=2" in log
    assert re.search(r"\(learner-[01]\): The actor died", log), log[-3000:]  # names the rank
    _assert_same_run(out, never_stopped)
