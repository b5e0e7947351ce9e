"""The gap between the sampler's logprobs and the learner's, per dtype and rollout engine, at
PPO step 1 on a small model (policy = reference): what `rollout.logprob_source: auto` is chosen
from (docs/gpu.md). CPU only; the same script runs on a GPU machine for its own numbers.

    .venv/bin/python bench/logprob_gaps.py [--rollouts 64]
    .venv-vllm/bin/python bench/logprob_gaps.py --engines hf vllm

vllm needs vLLM installed (.venv-vllm on CPUs). The model is tests/first_step.py's: the smoke
preset at hidden size 64, heads of 32, LoRA SFT and reward model, untrained.
Prints one line per (dtype, engine): the sampler vs learner gap (mean, max per token), and KL
and val/ratio_first of one update with the old logprobs from the sampler and from the learner.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script: the library and tests' tiny-run builder

from rlhf_ray.run import metrics  # noqa: E402
from tests.first_step import DTYPES, first_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=["hf"], choices=["hf", "vllm"])
    parser.add_argument("--rollouts", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines:
            for name in DTYPES:
                out = Path(tmp) / f"{engine}-{name}"
                _, tokens, stats = first_step(out, name, args.rollouts, engine)
                learner, sampler = stats["learner"], stats.get("sampler")
                print(
                    f"{engine:5} {name:24} tokens {tokens:5}  gap mean "
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
