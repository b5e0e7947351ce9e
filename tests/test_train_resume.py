"""Tier 2: the SFT and reward phases on Ray Train survive a killed training worker and a
stopped driver.

Each run is the real driver (`python jobs/rlhf.py --phases <phase>`) in its own process, joined
to the session's local Ray, starting from the tiny run's base model (and, for the reward phase,
its SFT model). A fault is injected once Ray Train has recorded the first epoch checkpoint; the
phase must then finish from that checkpoint, not from step 0, with TensorBoard showing every
step once. A stopped reward phase must also end bit for bit where a run never stopped ends: the
same weights and per-step metrics. (Both loops resume through the same module; the SFT phase
is not run a third time to compare it too, to keep CI short.)
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf_ray.run import metrics
from rlhf_ray.run.checkpoints import phase_dir, read_metrics
from rlhf_ray.train.common import train_storage
from tests.conftest import copy_outputs, finish, session_ray_processes, start_driver

TIMEOUT = 300
# 1024 rows (pairs) over 2 workers in batches of 16: 32 steps (a few seconds) an epoch, so a
# fault injected right after the first epoch's checkpoint lands in the second epoch.
EPOCHS, STEPS_PER_EPOCH = 3, 32
SETTINGS = {
    "sft": ["--sft.epochs", str(EPOCHS), "--data.num_sft", "1024", "--run.evaluate", "false"],
    # 1138 pairs, of which the smoke preset's eval_fraction 0.1 holds out 114: 1024 train.
    "reward": [
        *("--reward.epochs", str(EPOCHS), "--data.num_preferences", "1138"),
        *("--run.evaluate", "false"),
    ],
}
WALL_CLOCK = (metrics.SFT_TOKENS_PER_S,)
INPUTS = {"sft": ("base",), "reward": ("base", "sft")}  # from the tiny run


def _run_dir(tmp_path: Path, tiny_run, phase: str, name: str) -> Path:
    """An output directory holding what `phase` starts from, from the tiny run."""
    out = tmp_path / name
    copy_outputs(tiny_run[0], out, INPUTS[phase])
    return out


def _start(out: Path, phase: str) -> subprocess.Popen:
    return start_driver(out, "--phases", phase, *SETTINGS[phase])


def _recorded_checkpoints(out: Path, phase: str) -> int:
    """Epoch checkpoints Ray Train has recorded (its snapshot is written after each one)."""
    snapshot = train_storage(out, phase) / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(snapshot.read_text())["checkpoint_results"])
    except (FileNotFoundError, json.JSONDecodeError):  # not yet, or being written
        return 0


def _wait_for_first_epoch(out: Path, phase: str, process: subprocess.Popen) -> None:
    deadline = time.time() + TIMEOUT
    while _recorded_checkpoints(out, phase) == 0:
        assert process.poll() is None, f"the driver exited with {process.returncode} before"
        assert time.time() < deadline, f"no epoch checkpoint within {TIMEOUT}s"
        time.sleep(0.02)


def _per_step_metrics(out: Path, phase: str) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(out / "tb" / phase))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag not in WALL_CLOCK
    }


def _outcome(out: Path, phase: str) -> tuple[dict, dict]:
    return _per_step_metrics(out, phase), load_file(phase_dir(out, phase) / "model.safetensors")


def _assert_resumed_from_an_epoch_checkpoint(out: Path, phase: str) -> dict:
    """The phase took every step once, continuing from an epoch checkpoint, not from step 0;
    returns its per-step metrics."""
    done = read_metrics(phase_dir(out, phase))
    assert done["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert done["resumed_at_step"] in (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH), done
    got = _per_step_metrics(out, phase)
    loss = next(tag for tag in got if tag.endswith("/loss"))  # logged every step
    assert [step for step, _ in got[loss]] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert not train_storage(out, phase).exists()  # epoch checkpoints go once the phase is done
    return got


def test_a_killed_training_worker_restarts_from_the_epoch_checkpoint(local_ray, tiny_run, tmp_path):
    out = _run_dir(tmp_path, tiny_run, "sft", "worker-killed")
    driver = _start(out, "sft")
    _wait_for_first_epoch(out, "sft", driver)
    workers = session_ray_processes("ray::RayTrainWorker")
    assert len(workers) == 2
    workers[1].kill()  # SIGKILL one rank mid-epoch: Ray Train restarts the group
    assert finish(driver) == 0, (tmp_path / "worker-killed.log").read_text()[-3000:]
    _assert_resumed_from_an_epoch_checkpoint(out, "sft")
    log = (tmp_path / "worker-killed.log").read_text()
    assert "[sft] continuing from the checkpoint of epoch" in log  # the group restarted


def test_a_stopped_phase_resumes_to_the_same_model_as_one_never_stopped(
    local_ray, tiny_run, tmp_path
):
    out = _run_dir(tmp_path, tiny_run, "reward", "stopped")
    first = _start(out, "reward")
    _wait_for_first_epoch(out, "reward", first)
    first.kill()  # the job's Ray Train controller and workers die with their driver
    assert finish(first) == -9
    assert not (out / "reward").exists()
    assert finish(_start(out, "reward")) == 0, (tmp_path / "stopped.log").read_text()[-3000:]
    got = _assert_resumed_from_an_epoch_checkpoint(out, "reward")

    never_stopped = _run_dir(tmp_path, tiny_run, "reward", "uninterrupted")
    code = finish(_start(never_stopped, "reward"))
    assert code == 0, (tmp_path / "uninterrupted.log").read_text()[-3000:]
    assert read_metrics(phase_dir(never_stopped, "reward"))["resumed_at_step"] == 0
    expected, expected_weights = _outcome(never_stopped, "reward")
    assert got == expected  # every per-step metric, bit for bit
    weights = load_file(phase_dir(out, "reward") / "model.safetensors")
    assert weights.keys() == expected_weights.keys()
    for name, tensor in weights.items():
        assert tensor.equal(expected_weights[name]), name
