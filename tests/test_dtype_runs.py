"""The GPU dtypes end to end on this CPU (gpu_path, e2e), every phase through the driver:
- qlora, the lesson's recipe as the mistral-7b-qlora preset sets it: a 4-bit nf4 base (double
  quantisation, bf16 compute, bitsandbytes' CPU kernels), LoRA in every phase, the model's own
  dtype bf16, on the smoke model at hidden size 64 (4-bit blocks);
- bf16: the smoke preset with `--model.dtype bfloat16`, SFT and reward model fully fine-tuned in
  bf16 weights.

What a GPU would also show is in docs/gpu.md; here: the phases run, PPO's first step starts
where policy and reference are the same model (KL 0, ratio 1: the old logprobs come from the
learner, where generate's bf16 decode differs by ~1e-3), and the exported policy loads with
transformers alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from jobs import rlhf
from rlhf_ray.run import metrics
from rlhf_ray.run.trackers import read_metrics_log

pytestmark = [pytest.mark.gpu_path, pytest.mark.e2e, pytest.mark.slow]

RUNS = {
    "qlora": {
        "quantization.load_in_4bit": "true",
        "model.dtype": "bfloat16",
        "model.hidden_size": "64",
        "model.intermediate_size": "128",
        "sft.method": "lora",
        "reward.method": "lora",
    },
    # one Ray Train worker: DDP's bf16 reduction here would be gloo's, no GPU path (NCCL's
    # is); the qlora run keeps two (DDP beside frozen 4-bit weights)
    "bf16": {"model.dtype": "bfloat16", "resources.train_workers": "1"},
}


@pytest.fixture(scope="module", params=list(RUNS))
def dtype_run(request, local_ray, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"{request.param}-run") / "out"
    argv = ["--config", "smoke", "--output_dir", str(out), "--ppo.steps", "2"]
    for key, value in RUNS[request.param].items():
        argv += [f"--{key}", value]
    assert rlhf.main(argv) == 0
    return out


def test_ppo_starts_where_policy_and_reference_are_one_model(dtype_run):
    first = read_metrics_log(dtype_run, "ppo")[0]
    assert abs(first[metrics.KL]) < 1e-6
    assert abs(first[metrics.RATIO_FIRST] - 1) < 1e-6
    # the sampler's bf16 decode, measured against the learner's pass
    assert 0 < first[metrics.LOGPROB_GAP_MAX] < 1e-2


def test_the_exported_policy_loads_with_transformers_alone(dtype_run):
    model = AutoModelForCausalLM.from_pretrained(dtype_run / "policy", dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 7, 9]])
    logits = model(input_ids=ids).logits
    assert logits.shape[:2] == (1, 4) and torch.isfinite(logits.float()).all()
    assert (dtype_run / "policy" / "adapter" / "adapter_model.safetensors").is_file()
    assert (dtype_run / "summary.json").is_file()
