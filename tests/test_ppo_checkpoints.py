"""Tier 1: PPO checkpoints on disk (no Ray): atomic writes, crash safety, exact state."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import ray
import torch

from jobs.ppo import checkpoint
from jobs.ppo.pending import Pending
from rlhf_ray.errors import UserInputError
from rlhf_ray.ppo.messages import RolloutBatch
from rlhf_ray.ppo.run_state import PromptStream
from rlhf_ray.run import ppo_checkpoints as ckpt
from rlhf_ray.run import saved_state
from tests.test_messages import shard_a


def _tensors(step: int) -> dict[str, torch.Tensor]:
    return {
        "learner/policy/w": torch.full((2, 3), float(step)),
        "learner/rng/cpu": torch.get_rng_state(),
    }


def test_round_trip_and_only_the_newest_k_are_kept(tmp_path):
    for step in range(1, 5):
        ckpt.write_checkpoint(tmp_path, step, _tensors(step), {"step": step}, keep=2)
    assert ckpt.complete_steps(tmp_path) == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3", "step-4"]
    # safetensors and JSON only: nothing that runs code when loaded
    assert {p.name for p in (tmp_path / "step-4").iterdir()} == {
        ckpt.TENSORS_FILE,
        ckpt.STATE_FILE,
        ckpt.COMPLETE_FILE,
    }
    tensors, state = ckpt.read_checkpoint(ckpt.newest_complete(tmp_path))
    assert state == {"step": 4}
    assert tensors["learner/policy/w"].equal(torch.full((2, 3), 4.0))
    assert tensors["learner/rng/cpu"].equal(torch.get_rng_state())


CRASH_WHILE_WRITING = """
import os, sys, torch
from pathlib import Path
from rlhf_ray.errors import UserInputError
from rlhf_ray.run import ppo_checkpoints as ckpt

def die(path):  # the process is killed once the tensors are on disk, before the rename
    os._exit(9)

ckpt._fsync = die
ckpt.write_checkpoint(Path(sys.argv[1]), 3, {"w": torch.ones(4)}, {"step": 3}, keep=1)
"""


def test_a_process_killed_while_writing_leaves_the_previous_checkpoint(tmp_path):
    ckpt.write_checkpoint(tmp_path, 2, _tensors(2), {"step": 2}, keep=1)
    done = subprocess.run([sys.executable, "-c", CRASH_WHILE_WRITING, str(tmp_path)])
    assert done.returncode == 9
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".step-3.tmp-")]
    assert leftovers  # the half-written checkpoint is there, under its temporary name
    assert ckpt.newest_complete(tmp_path) == tmp_path / "step-2"
    assert ckpt.remove_incomplete(tmp_path) == leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["step-2"]
    assert ckpt.read_checkpoint(tmp_path / "step-2")[1] == {"step": 2}


def test_a_renamed_checkpoint_without_its_marker_is_not_used(tmp_path):
    """Killed between the rename and COMPLETE: ignored, removed, and the older one kept."""
    ckpt.write_checkpoint(tmp_path, 1, _tensors(1), {"step": 1}, keep=1)
    ckpt.write_checkpoint(tmp_path, 2, _tensors(2), {"step": 2}, keep=2)
    (tmp_path / "step-2" / ckpt.COMPLETE_FILE).unlink()
    assert ckpt.newest_complete(tmp_path) == tmp_path / "step-1"
    assert ckpt.remove_incomplete(tmp_path) == ["step-2"]


def test_an_old_checkpoint_is_deleted_only_after_the_new_one_is_complete(tmp_path, monkeypatch):
    ckpt.write_checkpoint(tmp_path, 1, _tensors(1), {"step": 1}, keep=1)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        ckpt.write_checkpoint(tmp_path, 2, _tensors(2), {"step": 2}, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]  # kept, and no temporary left


def test_optimizer_state_round_trip_continues_exactly():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=0.1)

    def step(optimizer, weights):
        loss = sum((w**2).sum() for w in weights)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        step(opt, params)
    tensors, groups = saved_state.optimizer_to_tensors(opt)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = torch.optim.AdamW(copies, lr=0.5)  # settings come from the checkpoint too
    saved_state.optimizer_from_tensors(restored, tensors, groups)
    step(opt, params)
    step(restored, copies)
    for original, copy in zip(params, copies, strict=True):
        assert original.equal(copy)


def test_prompt_stream_continues_in_the_same_order():
    prompts = [f"p{i}" for i in range(7)]
    stream = PromptStream(prompts, seed=3)
    stream.take(5)
    saved = stream.state()
    expected = stream.take(12)
    resumed = PromptStream(prompts, seed=999)
    resumed.restore(saved)
    assert resumed.take(12) == expected


def test_rng_state_round_trip():
    saved = saved_state.rng_state()
    first = torch.rand(5)
    saved_state.set_rng_state(saved)
    assert torch.rand(5).equal(first)


def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path):
    path = ckpt.write_checkpoint(tmp_path, 1, _tensors(1), {"step": 1}, keep=1)
    (path / ckpt.TENSORS_FILE).write_bytes(b"\x00" * 16)  # corrupted after it was complete
    with pytest.raises(UserInputError, match="step-1: this PPO checkpoint cannot be read"):
        ckpt.read_checkpoint(path)
    (path / ckpt.STATE_FILE).write_text("{not json")
    with pytest.raises(UserInputError, match="delete the directory"):
        ckpt.read_checkpoint(path)


def _queued(version: int, rank: int, prompt: str) -> RolloutBatch:
    return replace(shard_a(), policy_version=version, generator_rank=rank, prompts=[prompt])


def _restored(tensors: dict, state: dict) -> list[tuple]:
    """Each restored batch as (prompt ids, receipts, its shards' (version, prompts, response))."""
    return [
        (
            p.prompt_ids,
            ray.get(p.receipts, timeout=60),
            [(b.policy_version, b.prompts, b.response.tolist()) for b in ray.get(p.refs)],
        )
        for p in checkpoint.restored_queue(tensors, state)
    ]


def test_the_batches_queued_ahead_round_trip_and_a_one_batch_checkpoint_still_resumes(local_ray):
    """With ppo.max_policy_lag 2 a checkpoint holds two batches asked for ahead, each of its
    shards (one per generator); a checkpoint written before the queue held one batch under
    other keys, and resumes as a queue of one."""
    queued = [[_queued(4, 0, "a"), _queued(4, 1, "b")], [_queued(5, 0, "c")]]
    receipts = [[{"rows": 1, "policy_version": 4}] * 2, [{"rows": 1, "policy_version": 5}]]
    queue = [
        Pending([], [], [], prompt_ids=ids, dispatched_at=0.0, sampled=got)
        for ids, got in zip([[3], [7]], receipts, strict=True)
    ]
    tensors = checkpoint.checkpoint_tensors({}, {}, queued)
    state = {"queue": checkpoint.queue_info(queue, queued)}
    response = shard_a().response.tolist()
    assert _restored(tensors, state) == [
        ([3], receipts[0], [(4, ["a"], response), (4, ["b"], response)]),
        ([7], receipts[1], [(5, ["c"], response)]),
    ]
    # the layout before the queue: the first batch's tensors under the same names
    first = {k: v for k, v in tensors.items() if not k.startswith("queued")}
    old = {
        "pending": state["queue"][0]["shards"],
        "pending_receipts": receipts[0],
        "pending_prompt_ids": [3],
    }
    assert _restored(first, old) == _restored(tensors, state)[:1]
    assert _restored({}, {"pending": [], "pending_receipts": [], "pending_prompt_ids": []}) == []
