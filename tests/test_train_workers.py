"""Tier 2: Ray Train workers start from equal weights and stay equal (real Ray, 2 CPU workers),
and FSDP2 trains to the weights DDP trains to.

Gradients are averaged over the ranks, so data-parallel training is only right if every rank
holds the same trainable weights. The random parts are the ones at risk: a new reward `score`
head and LoRA's `lora_A`. One `fit` (Ray Train start-up costs ~20 s) covers, under DDP, three
models: the reward model with full fine-tuning, the reward model with LoRA, and the SFT policy
with LoRA. The last is built after steps on each rank's own rows, which leave torch's RNG in a
different state per rank (LoRA dropout), so only DDP's broadcast from rank 0 keeps it equal.
The same `fit` then trains the full reward model and the LoRA SFT policy a few steps under DDP
and under FSDP2, and continues the FSDP2 ones from their whole weights and optimizer moments
saved as an epoch checkpoint saves them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from ray import cloudpickle
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from jobs import phases
from rlhf_ray.data.encoding import sft_example
from rlhf_ray.data.prepare import read_rows
from rlhf_ray.data.tokenizer import load_tokenizer
from rlhf_ray.models.forward import SequenceScores, causal_logits
from rlhf_ray.models.loading import trainable_state
from rlhf_ray.train import reward, sft
from rlhf_ray.train.common import Worker, shard, trainable_params, worker_setup
from rlhf_ray.train.launch import launch
from rlhf_ray.train.settings import RewardWorkerSettings, SFTWorkerSettings
from rlhf_ray.train.sharding import (
    load_whole_optimizer_state,
    load_whole_trainable_state,
    optimizer_step,
    whole_optimizer_state,
    whole_trainable_state,
    wrap,
)
from tests.conftest import smoke_config

CASES = ("reward-full", "reward-lora", "sft-lora")
ROWS_PER_RANK = 4  # one small batch per rank; each rank's rows differ (sharded by rank)
SHARDING_CASES = ("reward-full", "sft-lora")  # trained under DDP and under FSDP2
STEPS = 2  # before the checkpoint; one more after it
SHARDING_SEED = 7


def _save(model, out: Path, case: str, stage: str, rank: int) -> None:
    save_file(trainable_state(model), out / f"{case}-{stage}-rank{rank}.safetensors")


def _one_step(model, loss: torch.Tensor) -> None:
    """One optimizer step as the loops take it: backward (DDP averages), clip, AdamW."""
    params = trainable_params(model)
    loss.backward()
    optimizer_step(torch.optim.AdamW(params, lr=1e-2), params, 1.0)


def _equal_weights_loop(config: dict) -> None:
    """Ray Train worker: build each model with the loops' own builders, save its trainable
    weights after set-up and after one step on this rank's rows."""
    rm_settings: RewardWorkerSettings = config["reward"]
    sft_settings: SFTWorkerSettings = config["sft"]
    out = Path(config["out"])
    worker = worker_setup(rm_settings.worker_cpus, rm_settings.seed, "ddp")
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
        scorer = wrap(SequenceScores(model), worker)
        _save(model, out, f"reward-{method}", "setup", worker.rank)
        chosen, rejected = reward.pair_scores(scorer, pairs, pad, worker.device)
        _one_step(model, reward.bradley_terry_loss(chosen, rejected))
        _save(model, out, f"reward-{method}", "step", worker.rank)

    rows = shard(read_rows(sft_settings.data_dir, "sft"), worker.rank, worker.world)[:ROWS_PER_RANK]
    examples = [sft_example(tok, r["prompt"], r["completion"], sft_settings.limits) for r in rows]
    model = sft.build_sft_model(sft_settings, worker)
    net = wrap(model, worker)
    _save(model, out, "sft-lora", "setup", worker.rank)
    ids, mask, labels = (t.to(worker.device) for t in sft.collate(examples, pad))
    _one_step(model, sft.completion_only_loss(causal_logits(net, ids, mask), labels))
    _save(model, out, "sft-lora", "step", worker.rank)

    for sharded in (False, True):
        on = dataclasses.replace(worker, sharded=sharded)
        _sharding_case("reward-full", config, on, pairs, pad, out)
        _sharding_case("sft-lora", config, on, examples, pad, out)


def _training(case: str, config: dict, worker, pad: int):
    """(model, loss of some rows, its trainable params, AdamW) of `case`, built as the loops
    build it and wrapped for `worker`. The same seed first under DDP and FSDP2: the same new
    `score` head or `lora_A`, and the same dropout draws after."""
    torch.manual_seed(SHARDING_SEED)
    if case == "reward-full":
        rm_settings = config["reward"]
        settings = dataclasses.replace(
            rm_settings, reward=dataclasses.replace(rm_settings.reward, method="full")
        )
        model = reward.build_reward_model(settings, worker, pad)
        scorer = wrap(SequenceScores(model), worker)

        def loss(rows):
            return reward.bradley_terry_loss(*reward.pair_scores(scorer, rows, pad, worker.device))

    else:  # sft-lora: the test's SFT settings train a LoRA adapter
        model = sft.build_sft_model(config["sft"], worker)
        net = wrap(model, worker)

        def loss(rows):
            ids, mask, labels = (t.to(worker.device) for t in sft.collate(rows, pad))
            return sft.completion_only_loss(causal_logits(net, ids, mask), labels)

    params = trainable_params(model)
    assert all(isinstance(p, DTensor) for p in params) == worker.sharded  # FSDP2's shards
    return model, loss, params, torch.optim.AdamW(params, lr=1e-2)


def _steps(training, rows: list, count: int) -> None:
    _, loss, params, optimizer = training
    for _ in range(count):
        loss(rows).backward()
        optimizer_step(optimizer, params, 1.0)


def _save_whole(model, path: Path, worker) -> None:
    state = whole_trainable_state(model, worker)  # every rank: FSDP2 gathers
    if worker.is_chief:
        save_file(state, path)


def _sharding_case(case: str, config: dict, worker, rows: list, pad: int, out: Path) -> None:
    """`case` trained STEPS steps under DDP or FSDP2 (`worker.sharded`); its whole weights and
    optimizer moments saved as an epoch checkpoint saves them and loaded into a new model and
    optimizer as a resumed loop loads them (each rank cuts its shard); one more step on both."""
    name = f"{case}-{'fsdp' if worker.sharded else 'ddp'}"
    first = _training(case, config, worker, pad)
    _steps(first, rows, STEPS)
    _save_whole(first[0], out / f"{name}-trained.safetensors", worker)
    moments = whole_optimizer_state(first[3], worker)
    if worker.is_chief:
        save_file(moments[0], out / f"{name}-moments.safetensors")
        (out / f"{name}-groups.json").write_text(json.dumps(moments[1]))
    torch.distributed.barrier()  # the chief's files are written before any rank reads them
    again = _training(case, config, worker, pad)
    load_whole_trainable_state(again[0], load_file(out / f"{name}-trained.safetensors"))
    groups = json.loads((out / f"{name}-groups.json").read_text())
    load_whole_optimizer_state(again[3], load_file(out / f"{name}-moments.safetensors"), groups)
    for training, stage in ((first, "after"), (again, "resumed")):
        torch.manual_seed(SHARDING_SEED + 1)  # the same dropout draws in both
        _steps(training, rows, 1)
        _save_whole(training[0], out / f"{name}-{stage}.safetensors", worker)
    if not worker.sharded:  # every rank's own copy, which DDP keeps equal
        _save(first[0], out, name, "after", worker.rank)


@pytest.fixture(scope="module")
def trained(local_ray, tiny_run, tmp_path_factory) -> Path:
    """One Ray Train `fit` of `_equal_weights_loop` on 2 workers -> the folder of its files."""
    run_dir, prepared = tiny_run
    out = tmp_path_factory.mktemp("train-workers")
    cfg = smoke_config(run_dir, **{"sft.method": "lora"})  # sft/ there is the untrained base
    rm_settings = phases.reward_worker_settings(cfg, prepared)
    sft_settings = phases.sft_worker_settings(cfg, prepared)
    assert cfg.resources.train_workers == 2
    config = {"reward": rm_settings, "sft": sft_settings, "out": str(out)}
    # Ray workers cannot import this test module by name: send its functions by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        launch("equal-weights", _equal_weights_loop, config, cfg.resources, out)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    return out


def _gaps(a: dict, b: dict) -> dict[str, float]:
    """Largest |b - a| of each tensor (same names in both)."""
    assert a.keys() == b.keys()
    return {name: (b[name] - a[name]).abs().max().item() for name in a}


def test_two_train_workers_hold_equal_trainable_weights_after_setup_and_a_step(trained):
    differ = []  # (case, stage, tensor, largest |rank 1 - rank 0|)
    for case in CASES:
        weights = {
            (stage, rank): load_file(trained / f"{case}-{stage}-rank{rank}.safetensors")
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


def test_fsdp_trains_to_the_weights_ddp_trains_to_and_resumes_exactly(trained):
    """Under DDP both ranks end with the very same weights; FSDP2 ends within float32 rounding of
    them (its reductions sum in another order); and under either, a model and optimizer loaded
    from the whole state take the very step the originals take."""
    for case in SHARDING_CASES:
        ddp, fsdp = (
            {
                stage: load_file(trained / f"{case}-{kind}-{stage}.safetensors")
                for stage in ("trained", "after", "resumed")
            }
            for kind in ("ddp", "fsdp")
        )
        rank0, rank1 = (
            load_file(trained / f"{case}-ddp-after-rank{r}.safetensors") for r in (0, 1)
        )
        assert rank0.keys() == rank1.keys() == ddp["after"].keys(), case
        assert all(rank0[n].equal(rank1[n]) for n in rank0), case
        assert all(rank0[n].equal(ddp["after"][n]) for n in rank0), case  # no module. prefix
        assert any(not ddp["after"][n].equal(ddp["trained"][n]) for n in rank0), case  # moved
        for stage in ("trained", "after"):
            gaps = _gaps(ddp[stage], fsdp[stage])
            assert max(gaps.values()) < 1e-5, (case, stage, gaps)
        for kind, states in (("ddp", ddp), ("fsdp", fsdp)):
            resumed, after = states["resumed"], states["after"]
            assert all(resumed[n].equal(after[n]) for n in after), (case, kind)


def test_one_worker_trains_the_model_itself():
    """With one worker nothing is wrapped: the step is the one it was without Ray Train."""
    module = torch.nn.Linear(2, 2)
    worker = Worker(rank=0, world=1, device=torch.device("cpu"), sharded=False)
    assert wrap(module, worker) is module
    assert whole_trainable_state(module, worker).keys() == {"weight", "bias"}
