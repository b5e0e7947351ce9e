"""The lesson's recipe end to end on this CPU (gpu_path, e2e): every phase with a 4-bit nf4 base
(double quantisation, bf16 compute, bitsandbytes' CPU kernels), LoRA in every phase and the
model's own dtype bf16, as the mistral-7b-qlora preset sets them, on the smoke model at hidden
size 64 (4-bit blocks).

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

pytestmark = [pytest.mark.gpu_path, pytest.mark.e2e]

QLORA = {
    "quantization.load_in_4bit": "true",
    "model.dtype": "bfloat16",
    "model.hidden_size": "64",
    "model.intermediate_size": "128",
    "sft.method": "lora",
    "reward.method": "lora",
    "ppo.steps": "2",
}


@pytest.fixture(scope="module")
def qlora_run(local_ray, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qlora-run") / "out"
    argv = ["--config", "smoke", "--output_dir", str(out)]
    for key, value in QLORA.items():
        argv += [f"--{key}", value]
    assert rlhf.main(argv) == 0
    return out


def test_ppo_starts_where_policy_and_reference_are_one_model(qlora_run):
    first = read_metrics_log(qlora_run, "ppo")[0]
    assert abs(first[metrics.KL]) < 1e-6
    assert abs(first[metrics.RATIO_FIRST] - 1) < 1e-6
    # the sampler's bf16 decode, measured against the learner's pass
    assert 0 < first[metrics.LOGPROB_GAP_MAX] < 1e-2


def test_the_exported_policy_loads_with_transformers_alone(qlora_run):
    model = AutoModelForCausalLM.from_pretrained(qlora_run / "policy", dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 7, 9]])
    logits = model(input_ids=ids).logits
    assert logits.shape[:2] == (1, 4) and torch.isfinite(logits.float()).all()
    assert (qlora_run / "policy" / "adapter" / "adapter_model.safetensors").is_file()
    assert (qlora_run / "summary.json").is_file()
