"""Rollout generators join and leave a running PPO job (`rlhf-ray scale`), with no prompt lost
or sampled twice: the split arithmetic alone, the command's refusals, and a real run on a local
Ray scaled 1 -> 2 -> 1 through the command while it trains."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from jobs.ppo.loop import PPOLoop, StopRequest
from jobs.ppo.roles import create_roles
from jobs.ppo.scaling import fitting_count, start_control
from rlhf_ray.data.prepare import read_rows
from rlhf_ray.errors import UserInputError
from rlhf_ray.ppo.run_state import PromptStream
from rlhf_ray.ppo.scaling import check_generator_count, scale_plan, split_rows
from rlhf_ray.run.ledger import RolloutLedger
from rlhf_ray.run.ppo_checkpoints import read_checkpoint
from tests.autoscale_scenario import STEPS
from tests.conftest import run_scenario, smoke_config

REPO = Path(__file__).resolve().parent.parent


def test_rows_are_split_as_evenly_as_can_be():
    assert split_rows(8, 2) == [(0, 4), (4, 8)]
    assert split_rows(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert split_rows(2, 3) == [(0, 1), (1, 2), (2, 2)]  # the last generator gets none
    with pytest.raises(ValueError, match="over 0 generators"):
        split_rows(8, 0)


def test_scale_plan_retires_the_newest_and_never_reuses_a_rank():
    assert not scale_plan([0], 1, next_rank=1)
    assert scale_plan([0], 3, next_rank=1).start == (1, 2)
    assert scale_plan([0, 1, 2], 1, next_rank=3).retire == (1, 2)
    assert scale_plan([0, 2], 3, next_rank=3).start == (3,)  # rank 1 left: its seed is not reused
    assert scale_plan([0, 1], 3, next_rank=3).start == (3,)  # 3 -> 2 -> 3: rank 2 stays retired
    with pytest.raises(ValueError, match="not above the ranks alive"):
        scale_plan([0, 1], 3, next_rank=1)
    with pytest.raises(UserInputError, match="whole number >= 1, got 0"):
        scale_plan([0], 0, next_rank=1)


@pytest.mark.parametrize("count", [0, -1, True, "2", 1.5])
def test_a_generator_count_below_one_or_not_whole_is_refused(count):
    with pytest.raises(UserInputError, match="whole number >= 1"):
        check_generator_count(count, "--rollout")


def _scale_command(*args: str) -> subprocess.CompletedProcess:
    """`rlhf-ray scale ...` in its own process, as a user runs it."""
    command = [sys.executable, "-m", "jobs.cli", "scale", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize("count", ["0", "-1", "two"])
def test_scale_refuses_a_count_below_one_before_connecting(count):
    done = _scale_command("--rollout", count, "--address", "127.0.0.1:1")  # nothing there
    assert done.returncode == 2, done.stderr
    assert "rlhf-ray scale --rollout must be a whole number >= 1" in done.stderr


def test_scale_against_no_running_job_says_so(local_ray):
    address = ray.get_runtime_context().gcs_address
    done = _scale_command("--rollout", "2", "--address", address)
    assert done.returncode == 1, done.stderr
    assert "no rlhf-ray job is running on this cluster" in done.stderr


def test_a_target_beyond_the_cluster_runs_as_many_generators_as_fit(local_ray, tmp_path):
    # The local Ray has 2 CPUs; learner, reward, reference and each generator take 0.25.
    cfg = smoke_config(tmp_path)
    assert fitting_count(cfg, target=10, current=1) == 5  # 0.75 + 5 x 0.25 = 2 CPUs
    assert fitting_count(cfg, target=3, current=1) == 3
    assert fitting_count(cfg, target=1, current=4) == 1  # scaling down always fits


def _wait_for(ledger: RolloutLedger, condition, run: threading.Thread, what: str) -> list:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        lines = ledger.read()
        if condition(lines):
            return lines
        assert run.is_alive(), f"the run ended before {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _back_to_one(lines: list[dict]) -> bool:
    """A step with one generator after the first step that had two."""
    counts = [len(line["generators"]) for line in lines]
    return 2 in counts and 1 in counts[counts.index(2) :]


def _up_again(lines: list[dict]) -> bool:
    """Two generators again after `_back_to_one`."""
    counts = [len(line["generators"]) for line in lines]
    if not _back_to_one(lines):
        return False
    down = counts.index(1, counts.index(2))
    return 2 in counts[down:]


@pytest.mark.slow  # the PPO driver loop, run to its end
def test_generators_scaled_1_2_1_2_while_the_run_trains(local_ray, tiny_run):
    """The second scale-up starts rollout-2: rank 1, retired, is never used again (its seed and
    actor name are the retired generator's, which may still be being stopped)."""
    out, prepared = tiny_run
    steps = 120
    cfg = smoke_config(out, **{"ppo.steps": str(steps), "ppo.checkpoint_every": "0"})
    prompts = [r["prompt"] for r in read_rows(prepared.data_dir, "prompts")]
    control = start_control(cfg, out.resolve())
    roles = create_roles(cfg, out)
    loop = PPOLoop(cfg, roles, PromptStream(prompts, cfg.run.seed), out, control)
    loop.ledger.keep_through(0)
    result: dict = {}

    def train() -> None:
        try:
            result["totals"] = loop.run(StopRequest())
        except BaseException as err:  # noqa: BLE001 (the test thread reports it)
            result["error"] = err

    run = threading.Thread(target=train)
    run.start()
    address = ray.get_runtime_context().gcs_address
    where = ("--address", address, "--output_dir", str(out))
    try:
        _wait_for(loop.ledger, lambda lines: len(lines) >= 2, run, "step 2")
        up = _scale_command("--rollout", "2", *where)
        assert up.returncode == 0, up.stderr
        assert "2 from its next step" in up.stdout
        two = _wait_for(
            loop.ledger, lambda ls: any(len(x["generators"]) == 2 for x in ls), run, "2 generators"
        )
        down = _scale_command("--rollout", "1", *where)
        assert down.returncode == 0, down.stderr
        _wait_for(loop.ledger, _back_to_one, run, "one generator again")
        again = _scale_command("--rollout", "2", *where)
        assert again.returncode == 0, again.stderr
        _wait_for(loop.ledger, _up_again, run, "two generators again")
        run.join(timeout=300)
        _, saved = read_checkpoint(loop.save_checkpoint(steps))
    finally:
        roles.stop()
        ray.kill(control, no_restart=True)
    assert "error" not in result, result.get("error")
    assert two, "never saw two generators"

    lines = loop.ledger.read()
    assert [line["step"] for line in lines] == list(range(1, steps + 1))  # each step once
    assert result["totals"]["steps"] == steps
    counts = [len(line["generators"]) for line in lines]
    first_two = counts.index(2)
    assert counts[:first_two] == [1] * first_two
    down = counts.index(1, first_two)  # came back down
    assert set(lines[first_two]["generators"]) == {"rollout-0", "rollout-1"}
    second_two = counts.index(2, down)
    assert set(lines[second_two]["generators"]) == {"rollout-0", "rollout-2"}
    assert counts[-1] == 2
    assert saved["generator_ranks"] == [0, 2]
    assert saved["next_generator_rank"] == 3  # a resumed run goes on with rank 3
    for line in lines:
        assert sum(g["rows"] for g in line["generators"].values()) == cfg.ppo.rollouts_per_step
        # Every generator samples with the newest weights: in sync mode the batch a step trains
        # on was sampled by the policy of the step before, new generators included.
        assert {g["policy_version"] for g in line["generators"].values()} == {line["step"] - 1}
    # Every prompt once per pass over the prompt set, however the generators came and went.
    used = [i for line in lines for i in line["prompt_ids"]]
    per_pass = len(prompts)
    for start in range(0, len(used) - per_pass + 1, per_pass):
        assert sorted(used[start : start + per_pass]) == list(range(per_pass))


@pytest.mark.slow  # a cluster of its own
def test_auto_scaling_grows_onto_a_joining_node_and_survives_its_removal(tiny_run, tmp_path):
    """tests/autoscale_scenario.py, in its own process: one 1-CPU node at the start, a second
    joins after step 2 and is removed two steps after a generator started there."""
    run = run_scenario("autoscale_scenario", str(tiny_run[0]), str(tmp_path))
    output = run["stdout"] + run["stderr"]
    assert "scenario_error" not in run, run["scenario_error"] + output
    assert run["exit"] == 0, output
    lines = run["ledger"]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1)), output
    counts = [len(line["generators"]) for line in lines]
    assert counts[0] == 1 and max(counts) == 2, counts  # grew once the node joined
    first_two = counts.index(2)
    assert first_two >= run["joined_after_step"], (counts, run["joined_after_step"])
    assert counts[-1] == 1, counts  # and shrank when it left
    for line in lines:  # no row lost or doubled, even in the step that lost its generator
        assert sum(g["rows"] for g in line["generators"].values()) == 8, line
        assert {g["policy_version"] for g in line["generators"].values()} == {line["step"] - 1}
