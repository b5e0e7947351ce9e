"""Tier 2: Ray Train workers start from equal weights and stay equal (real Ray, 2 CPU workers).

Gradients are all-reduced, so data-parallel training is only right if every rank holds the same
trainable weights. The random parts are the ones at risk: a new reward `score` head and LoRA's
`lora_A`. One `fit` (Ray Train start-up costs ~20 s) covers three models: the reward model with
full fine-tuning, the reward model with LoRA, and the SFT policy with LoRA. The last is built
after steps on each rank's own rows, which leave torch's RNG in a different state per rank
(LoRA dropout), so only the broadcast from rank 0 keeps it equal.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from ray import cloudpickle
from safetensors.torch import load_file, save_file

from jobs import phases
from rlhf_ray.data.encoding import sft_example
from rlhf_ray.data.prepare import read_rows
from rlhf_ray.data.tokenizer import load_tokenizer
from rlhf_ray.models.forward import causal_logits
from rlhf_ray.models.loading import trainable_state
from rlhf_ray.train import reward, sft
from rlhf_ray.train.common import optimizer_step, shard, trainable_params, worker_setup
from rlhf_ray.train.launch import launch
from rlhf_ray.train.settings import RewardWorkerSettings, SFTWorkerSettings
from tests.conftest import smoke_config

CASES = ("reward-full", "reward-lora", "sft-lora")
ROWS_PER_RANK = 4  # one small batch per rank; each rank's rows differ (sharded by rank)


def _save(model, out: Path, case: str, stage: str, rank: int) -> None:
    save_file(trainable_state(model), out / f"{case}-{stage}-rank{rank}.safetensors")


def _one_step(model, loss: torch.Tensor, worker) -> None:
    """One optimizer step as the loops take it: backward, all-reduce, clip, AdamW."""
    params = trainable_params(model)
    loss.backward()
    optimizer_step(torch.optim.AdamW(params, lr=1e-2), params, 1.0, worker.world)


def _equal_weights_loop(config: dict) -> None:
    """Ray Train worker: build each model with the loops' own builders, save its trainable
    weights after set-up and after one step on this rank's rows."""
    rm_settings: RewardWorkerSettings = config["reward"]
    sft_settings: SFTWorkerSettings = config["sft"]
    out = Path(config["out"])
    worker = worker_setup(rm_settings.worker_cpus, rm_settings.seed)
    tok = load_tokenizer(rm_settings.sft_path)
    pad = tok.pad_token_id

    pairs = [
        reward.encode_pair(tok, r, rm_settings.limits)
        for r in read_rows(rm_settings.data_dir, "preferences")
    ]
    pairs = shard(pairs, worker.rank, worker.world)[:ROWS_PER_RANK]
    for method in ("full", "lora"):
        settings = dataclasses.replace(
            rm_settings, reward=dataclasses.replace(rm_settings.reward, method=method)
        )
        model = reward.build_reward_model(settings, worker, pad)
        _save(model, out, f"reward-{method}", "setup", worker.rank)
        chosen, rejected = reward.pair_scores(model, pairs, pad, worker.device)
        _one_step(model, reward.bradley_terry_loss(chosen, rejected), worker)
        _save(model, out, f"reward-{method}", "step", worker.rank)

    rows = shard(read_rows(sft_settings.data_dir, "sft"), worker.rank, worker.world)[:ROWS_PER_RANK]
    examples = [sft_example(tok, r["prompt"], r["completion"], sft_settings.limits) for r in rows]
    model = sft.build_sft_model(sft_settings, worker)
    _save(model, out, "sft-lora", "setup", worker.rank)
    ids, mask, labels = (t.to(worker.device) for t in sft.collate(examples, pad))
    _one_step(model, sft.completion_only_loss(causal_logits(model, ids, mask), labels), worker)
    _save(model, out, "sft-lora", "step", worker.rank)


def test_two_train_workers_hold_equal_trainable_weights_after_setup_and_a_step(
    local_ray, tiny_run, tmp_path
):
    run_dir, prepared = tiny_run
    cfg = smoke_config(run_dir, **{"sft.method": "lora"})  # sft/ there is the untrained base
    rm_settings = phases.reward_worker_settings(cfg, prepared)
    sft_settings = phases.sft_worker_settings(cfg, prepared)
    assert cfg.resources.train_workers == 2
    config = {"reward": rm_settings, "sft": sft_settings, "out": str(tmp_path)}
    # Ray workers cannot import this test module by name: send its functions by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        launch("equal-weights", _equal_weights_loop, config, cfg.resources, tmp_path)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

    differ = []  # (case, stage, tensor, largest |rank 1 - rank 0|)
    for case in CASES:
        weights = {
            (stage, rank): load_file(tmp_path / f"{case}-{stage}-rank{rank}.safetensors")
            for stage in ("setup", "step")
            for rank in (0, 1)
        }
        setup0, step0 = weights["setup", 0], weights["step", 0]
        # The trainable set is what we expect: a score head, LoRA adapters, or both.
        if case.startswith("reward"):
            assert any("score" in name for name in setup0), (case, sorted(setup0))
        if case.endswith("lora"):
            assert any("lora_A" in name for name in setup0), (case, sorted(setup0))
        # The step really moved the weights, so equality after it is not inherited for free.
        assert any(not torch.equal(setup0[n], step0[n]) for n in setup0), case
        for stage in ("setup", "step"):
            rank0, rank1 = weights[stage, 0], weights[stage, 1]
            assert rank0.keys() == rank1.keys(), (case, stage)
            differ += [
                (case, stage, name, (rank1[name] - rank0[name]).abs().max().item())
                for name in rank0
                if not torch.allclose(rank1[name], rank0[name], rtol=1e-6, atol=1e-7)
            ]
    assert not differ, "ranks hold different trainable weights:\n" + "\n".join(
        f"  {case} after {stage}: {name} differs by up to {gap:.3g}"
        for case, stage, name, gap in differ
    )
