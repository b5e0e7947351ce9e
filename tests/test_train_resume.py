"""Tier 2: the SFT and reward phases on Ray Train survive a stopped driver and a killed
training worker, and end bit for bit where a run never stopped ends.

Each run is the real driver (`python jobs/rlhf.py --phases reward`) in its own process, joined
to the session's local Ray, starting from the tiny run's base and SFT models. The driver is
killed once Ray Train has recorded the first epoch checkpoint; the same command run again
continues from it, and one of its two training workers is killed once the second epoch's
checkpoint is recorded, so Ray Train restarts the group from that one. The phase must end with
every step in TensorBoard once, and the same weights and per-step metrics as a run never
stopped. Both loops resume through the same module (rlhf_ray/train/epoch_checkpoints.py); the
SFT phase is not run three more times to show it too, to keep CI short.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf_ray.run import metrics
from rlhf_ray.run.checkpoints import phase_dir, read_metrics
from rlhf_ray.train.launch import train_storage
from tests.conftest import (
    check_console,
    copy_outputs,
    finish,
    make_tiny_run,
    session_ray_processes,
    start_driver,
)

pytestmark = pytest.mark.slow  # a driver in its own process

TIMEOUT = 300
EPOCHS, STEPS_PER_EPOCH = 4, 32
# 1138 pairs, of which the smoke preset's eval_fraction 0.1 holds out 114: 1024 train, in
# batches of 16 over 2 workers: 32 steps (about 1.5 s) an epoch. Ray Train records an epoch's
# checkpoint a little after the workers write it (its controller polls them: every 2 s by
# default, 0.25 s in this suite, tests/conftest.py), so a fault injected once epoch 2 is recorded
# lands in epoch 3 or 4: two epochs after it leave room.
ARGS = (
    *("--phases", "reward", "--reward.epochs", str(EPOCHS)),
    *("--data.num_preferences", "1138", "--run.evaluate", "false"),
)
WALL_CLOCK = (metrics.SFT_TOKENS_PER_S,)


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory):
    """A tiny run prepared with this test's 1138 pairs: the embedded base's tokenizer learns
    from every row, so the base of a run with other data would be refused."""
    return make_tiny_run(tmp_path_factory.mktemp("pairs-run"), **{"data.num_preferences": "1138"})


def _run_dir(tmp_path: Path, pairs_run, name: str) -> Path:
    """An output directory holding what the reward phase starts from, from the tiny run."""
    out = tmp_path / name
    copy_outputs(pairs_run[0], out, ("base", "sft"))
    return out


def _recorded_checkpoints(out: Path) -> int:
    """Epoch checkpoints Ray Train has recorded (its snapshot is written after each one, and
    a resumed run starts from the one in storage)."""
    snapshot = train_storage(out, "reward") / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(snapshot.read_text())["checkpoint_results"])
    except (FileNotFoundError, json.JSONDecodeError):  # not yet, or being written
        return 0


def _wait_for_epoch(out: Path, epoch: int, process: subprocess.Popen) -> None:
    deadline = time.time() + TIMEOUT
    while _recorded_checkpoints(out) < epoch:
        assert process.poll() is None, f"the driver exited with {process.returncode} before"
        assert time.time() < deadline, f"no checkpoint of epoch {epoch} within {TIMEOUT}s"
        time.sleep(0.02)


def _per_step_metrics(out: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(out / "tb" / "reward"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag not in WALL_CLOCK
    }


def _weights(out: Path) -> dict:
    return load_file(phase_dir(out, "reward") / "model.safetensors")


def test_a_stopped_phase_and_a_killed_worker_end_where_a_run_never_stopped_ends(
    local_ray, pairs_run, tmp_path
):
    out = _run_dir(tmp_path, pairs_run, "stopped")
    first = start_driver(out, *ARGS)
    _wait_for_epoch(out, 1, first)
    first.kill()  # the job's Ray Train controller and workers die with their driver
    assert finish(first) == -9
    assert not (out / "reward").exists()

    again = start_driver(out, *ARGS)  # the same command, run again
    _wait_for_epoch(out, 2, again)
    workers = session_ray_processes("ray::RayTrainWorker")
    assert len(workers) == 2
    workers[1].kill()  # SIGKILL one rank mid-epoch: Ray Train restarts the group
    assert finish(again) == 0, (tmp_path / "stopped.log").read_text()[-3000:]
    log = (tmp_path / "stopped.log").read_text()
    assert "[reward] continuing from the checkpoint of epoch 1" in log  # the rerun
    assert "[reward] continuing from the checkpoint of epoch 2" in log  # the restarted group
    check_console(log, phases=())  # steps after a checkpoint are shown again when redone

    done = read_metrics(phase_dir(out, "reward"))
    assert done["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert done["resumed_at_step"] == 2 * STEPS_PER_EPOCH, done
    got = _per_step_metrics(out)
    loss = next(tag for tag in got if tag.endswith("/loss"))  # logged every step
    assert [step for step, _ in got[loss]] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert not train_storage(out, "reward").exists()  # epoch checkpoints go once it is done

    never_stopped = _run_dir(tmp_path, pairs_run, "uninterrupted")
    code = finish(start_driver(never_stopped, *ARGS))
    log = (tmp_path / "uninterrupted.log").read_text()
    assert code == 0, log[-3000:]
    check_console(log, phases=("reward",))  # the chief's progress lines reach the driver
    assert read_metrics(phase_dir(never_stopped, "reward"))["resumed_at_step"] == 0
    assert got == _per_step_metrics(never_stopped)  # every per-step metric, bit for bit
    expected_weights = _weights(never_stopped)
    weights = _weights(out)
    assert weights.keys() == expected_weights.keys()
    for name, tensor in weights.items():
        assert tensor.equal(expected_weights[name]), name
