"""Tier 2: a PPO phase stopped mid-run (SIGKILL; SIGTERM with `ppo.overlap`) and rerun, whose
rerun also loses its learner (rebuilt from its checkpoint), equals one never stopped.

Each run is the real driver (`python jobs/rlhf.py --phases ppo`) in its own process, joined to
the session's local Ray, on the tiny run's untrained SFT and reward models. Compared with the
uninterrupted run: every per-step metric TensorBoard shows (wall-clock figures aside), each
step exactly once, and the exported policy's weights, bit for bit (CPU, fp32).
"""

from __future__ import annotations

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

STEPS = 6  # stopped once step 2 is saved: later steps leave time for the signal and a fault
TIMEOUT = 300
DRIVER_ARGS = (
    *("--phases", "ppo", "--ppo.steps", str(STEPS), "--ppo.checkpoint_every", "1"),
    *("--run.evaluate", "false"),  # compared by their metrics and weights, not the gold judge
)
# Differ between runs by nature: wall-clock figures, and the synced object's size (the pickled
# tensors of a restored learner took 2 bytes more in one run)
WALL_CLOCK = ("time/", "roles/", metrics.TOKENS_PER_S, metrics.SYNC_BYTES)


def _run_dir(tmp_path: Path, tiny_run, name: str) -> Path:
    """An output directory whose SFT and reward phases are complete (the tiny run's)."""
    out = tmp_path / name
    copy_outputs(tiny_run[0], out, ("sft", "reward"))
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


def _args(overlap: bool) -> tuple[str, ...]:
    return (*DRIVER_ARGS, "--ppo.overlap", str(overlap).lower())


@pytest.fixture(scope="module")
def uninterrupted(local_ray, tiny_run, tmp_path_factory):
    """overlap -> (per-step metrics, policy weights) of a run never stopped, made when first
    asked for."""
    made = {}

    def outcome(overlap: bool):
        if overlap not in made:
            out = _run_dir(tmp_path_factory.mktemp("ppo-resume"), tiny_run, "uninterrupted")
            code = finish(start_driver(out, *_args(overlap)))
            assert code == 0, (out.parent / "uninterrupted.log").read_text()[-3000:]
            made[overlap] = _per_step_metrics(out), _policy_weights(out)
        return made[overlap]

    return outcome


def _assert_same_run(out: Path, uninterrupted) -> None:
    expected_metrics, expected_weights = uninterrupted
    got = _per_step_metrics(out)
    assert got.keys() == expected_metrics.keys()
    for tag, points in got.items():
        assert [step for step, _ in points] == list(range(1, STEPS + 1)), tag  # each step once
        assert points == expected_metrics[tag], tag
    weights = _policy_weights(out)
    assert weights.keys() == expected_weights.keys()
    for name, tensor in weights.items():
        assert tensor.equal(expected_weights[name]), name


def _stop_once_step_2_is_saved(out: Path, tmp_path: Path, stop_signal, overlap: bool) -> int:
    """Start the driver on `out`, send `stop_signal` once step 2's checkpoint is complete, and
    check how it ended; -> the last step saved."""
    first = start_driver(out, *_args(overlap))
    _wait_for_checkpoint(out, 2, first)
    first.send_signal(stop_signal)
    code = finish(first)
    log = (tmp_path / "stopped.log").read_text()
    if stop_signal == signal.SIGTERM:  # checkpoints after the step in progress, says so
        assert code == 143, log[-3000:]
        assert "Run the same command again to continue" in log
    else:
        assert code == -signal.SIGKILL
    stopped_at = max(complete_steps(out / "ppo_checkpoints"))
    assert 2 <= stopped_at <= STEPS - 3, log[-3000:]  # room for a fault in the rerun
    assert not (out / "policy").exists()
    return stopped_at


def test_a_killed_driver_then_a_killed_learner_end_as_a_run_never_stopped(
    local_ray, tiny_run, tmp_path, uninterrupted
):
    out = _run_dir(tmp_path, tiny_run, "stopped")
    stopped_at = _stop_once_step_2_is_saved(out, tmp_path, signal.SIGKILL, overlap=False)
    again = start_driver(out, *_args(overlap=False))
    _wait_for_checkpoint(out, stopped_at + 1, again)
    learners = session_ray_processes("ray::PPOLearner")
    assert len(learners) == 1
    learners[0].kill()  # SIGKILL: the process and everything it held are gone
    assert finish(again) == 0, (tmp_path / "stopped.log").read_text()[-3000:]
    log = (tmp_path / "stopped.log").read_text()
    assert f"[ppo] resuming after step {stopped_at}" in log
    assert "PPOLearner" in log and "[ppo] rebuilding every role from" in log
    assert "1 of ppo.max_learner_restarts=2" in log
    _assert_same_run(out, uninterrupted(False))


def test_a_stopped_overlapped_run_saves_the_batch_in_flight_and_ends_as_one_never_stopped(
    local_ray, tiny_run, tmp_path, uninterrupted
):
    """With overlap, the batch in flight at SIGTERM is saved and trained once, on resume."""
    out = _run_dir(tmp_path, tiny_run, "stopped")
    stopped_at = _stop_once_step_2_is_saved(out, tmp_path, signal.SIGTERM, overlap=True)
    assert finish(start_driver(out, *_args(overlap=True))) == 0, (
        tmp_path / "stopped.log"
    ).read_text()[-3000:]
    assert f"[ppo] resuming after step {stopped_at}" in (tmp_path / "stopped.log").read_text()
    _assert_same_run(out, uninterrupted(True))
