"""How well a run's reward model tells a right capital from a wrong one.

    .venv/bin/python bench/fact_judge.py RUN_DIR [RUN_DIR ...]

For each of the synthetic world's 48 fact prompts, the reward model in RUN_DIR/reward scores
"The capital of X is Y." for each of the 12 capitals, encoded as its training pairs were.
Prints, per run, the share of prompts where the right capital scores above every wrong one,
the share of wrong answers scored below the right one, and the mean margin of the right
capital over the best-scored wrong one. PPO can only learn the facts this judge knows
(docs/estimators.md: 15% to 94% of prompts across runs of the same preset).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# after the checkout is on the path
import torch  # noqa: E402

from rlhf_ray.config.command_line import parse_run_args  # noqa: E402
from rlhf_ray.data.encoding import completion_ids, prompt_ids  # noqa: E402
from rlhf_ray.data.prepare import limits_of  # noqa: E402
from rlhf_ray.data.tokenizer import load_tokenizer  # noqa: E402
from rlhf_ray.models.loading import FrozenModelSettings, load_frozen_scalar_model  # noqa: E402
from rlhf_ray.world import assistant_world  # noqa: E402


def fact_judgement(run_dir: Path) -> dict:
    """{"right_above_every_wrong", "wrong_below_right", "margin"} of RUN_DIR's reward model."""
    cfg = parse_run_args(["--config", str(run_dir / "config.yaml")])
    limits = limits_of(cfg.data)
    reward = str(run_dir / "reward")
    model = load_frozen_scalar_model(FrozenModelSettings(reward, cfg.model, cfg.quantization, 1, 0))
    tok = load_tokenizer(reward, cfg.model.trust_remote_code)
    capitals = list(assistant_world.CAPITALS.values())
    above_all, below, margins = [], [], []
    for spec in assistant_world.all_prompts():
        if spec.kind != "fact":
            continue
        scores = {}
        for capital in capitals:
            answer = f"The capital of {spec.subject} is {capital}."
            ids = prompt_ids(tok, spec.text, limits) + completion_ids(
                tok, spec.text, answer, limits
            )
            with torch.no_grad():
                scores[capital] = model(torch.tensor([ids])).logits[0, 0].item()
        right = scores.pop(spec.answer)
        above_all.append(right > max(scores.values()))
        below += [wrong < right for wrong in scores.values()]
        margins.append(right - max(scores.values()))
    return {
        "right_above_every_wrong": round(sum(above_all) / len(above_all), 3),
        "wrong_below_right": round(sum(below) / len(below), 3),
        "margin": round(sum(margins) / len(margins), 3),
    }


def main() -> None:
    torch.set_num_threads(1)
    for run_dir in sys.argv[1:]:
        print(json.dumps({"run": run_dir, **fact_judgement(Path(run_dir))}))


if __name__ == "__main__":
    main()
