"""The gap between the sampler's logprobs and the learner's, per dtype and rollout engine, at
PPO step 1 on a small model (policy = reference): what `rollout.logprob_source: auto` is chosen
from (docs/gpu.md). CPU only; the same script runs on a GPU machine for its own numbers.

    .venv/bin/python bench/logprob_gaps.py [--rollouts 64]
    .venv-vllm/bin/python bench/logprob_gaps.py --engines hf vllm

vllm needs vLLM installed (.venv-vllm on CPUs). The model: the smoke preset at hidden size 64
(heads of 32, which vLLM's CPU attention has; 4-bit blocks), untrained, prompts from its data.
Prints one line per (dtype, engine): the sampler vs learner gap (mean, max per token), and KL
and val/ratio_first of one update with the old logprobs from the sampler and from the learner.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script: the library and tests' tiny-run builder

from rlhf_ray.data.prepare import limits_of, read_rows  # noqa: E402
from rlhf_ray.models.loading import FrozenModelSettings  # noqa: E402
from rlhf_ray.ppo.learner import PPOLearner  # noqa: E402
from rlhf_ray.ppo.messages import Scores  # noqa: E402
from rlhf_ray.ppo.reference_model import ReferenceModel  # noqa: E402
from rlhf_ray.ppo.settings import EngineSettings, LearnerSettings, PolicySettings  # noqa: E402
from rlhf_ray.run import metrics  # noqa: E402
from tests.conftest import make_tiny_run, smoke_config  # noqa: E402

SHAPE = {"model.hidden_size": "64", "model.intermediate_size": "128", "model.num_heads": "2"}
DTYPES = {
    "float32": {},
    "bfloat16": {"model.dtype": "bfloat16"},
    "4-bit nf4, bf16 compute": {"quantization.load_in_4bit": "true"},
}


def generator(engine: str, policy: PolicySettings, rollout_len: int):
    if engine == "hf":
        from rlhf_ray.ppo.rollout_generator import RolloutGenerator

        return RolloutGenerator(policy, rank=0)
    from rlhf_ray.config.rollout import RolloutConfig
    from rlhf_ray.ppo.vllm_generator import VllmRolloutGenerator

    return VllmRolloutGenerator(policy, EngineSettings(RolloutConfig(), rollout_len), rank=0)


def measure(work: Path, name: str, engine: str, rollouts: int) -> dict:
    overrides = {**SHAPE, "sft.method": "lora", "reward.method": "lora", **DTYPES[name]}
    out, prepared = make_tiny_run(work / f"{len(list(work.iterdir()))}", **overrides)
    cfg = smoke_config(out, **overrides)
    policy = PolicySettings(
        str(out / "sft"), cfg.model, cfg.quantization, cfg.lora, limits_of(cfg.data), 1.0, 2, 0, 0
    )
    ppo = replace(cfg.ppo, rollouts_per_step=rollouts, minibatch_size=rollouts, epochs=1)
    settings = LearnerSettings(policy, str(out / "reward"), cfg.reward.method, ppo)
    rollout_len = cfg.data.max_prompt_tokens + cfg.data.max_completion_tokens
    sampler = generator(engine, policy, rollout_len)
    sampler.load_weights(PPOLearner(settings).weights())
    prompts = [row["prompt"] for row in read_rows(prepared.data_dir, "prompts")]
    prompts = (prompts * rollouts)[:rollouts]
    batch = sampler.generate(prompts, list(range(rollouts)))
    frozen = FrozenModelSettings(str(out / "sft"), cfg.model, cfg.quantization, 1, 0)
    ref = ReferenceModel(frozen, 1.0).logprobs(batch)
    stats = {}
    # vLLM's batches are always recomputed by the learner: there is no "sampler" row
    for source in ("learner", "sampler") if engine == "hf" else ("learner",):
        learner = PPOLearner(replace(settings, logprob_source=source))
        stats[source] = learner.train([replace(batch)], Scores(torch.zeros(rollouts), {}), [ref])
    return {"tokens": int(batch.response_mask.sum()), **stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=["hf"], choices=["hf", "vllm"])
    parser.add_argument("--rollouts", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines:
            for name in DTYPES:
                row = measure(Path(tmp), name, engine, args.rollouts)
                learner, sampler = row["learner"], row.get("sampler")
                print(
                    f"{engine:5} {name:24} tokens {row['tokens']:5}  gap mean "
                    f"{learner[metrics.LOGPROB_GAP_MEAN]:.1e} max "
                    f"{learner[metrics.LOGPROB_GAP_MAX]:.1e}  | sampler's: "
                    + (
                        f"KL {sampler[metrics.KL]:+.1e} ratio_first "
                        f"{sampler[metrics.RATIO_FIRST]:.6f}"
                        if engine == "hf"
                        else "(never used)"
                    )
                    + f"  | learner's: KL {learner[metrics.KL]:+.1e} ratio_first "
                    f"{learner[metrics.RATIO_FIRST]:.6f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
