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
from rlhf_ray.data.prepare import limits_of  # noqa: E402
from rlhf_ray.models.loading import FrozenModelSettings  # noqa: E402
from rlhf_ray.run.checkpoints import is_complete  # noqa: E402
from rlhf_ray.run.judges import REWARD_MODEL, JudgeSettings, judge_responses  # noqa: E402
from rlhf_ray.world import assistant_world  # noqa: E402


def reward_judge(run_dir: Path) -> JudgeSettings:
    """RUN_DIR's reward model as `eval.judges` scores held-out samples (rlhf_ray/run/judges.py)."""
    if not (run_dir / "config.yaml").is_file() or not is_complete(run_dir / "reward"):
        raise SystemExit(
            f"{run_dir}: not a run with a complete reward model (config.yaml, reward/)"
        )
    cfg = parse_run_args(["--config", str(run_dir / "config.yaml")])
    reward = str(run_dir / "reward")
    model = FrozenModelSettings(reward, cfg.model, cfg.quantization, 1, 0)
    return JudgeSettings(
        (REWARD_MODEL,), model, reward, cfg.model.trust_remote_code, limits_of(cfg.data), 64
    )


def capital_answers() -> tuple[list, list[str], list[list[str]]]:
    """(fact prompt specs, the 12 capitals, [prompt][capital] answers "The capital of X is Y.")."""
    facts = [spec for spec in assistant_world.all_prompts() if spec.kind == "fact"]
    capitals = list(assistant_world.CAPITALS.values())
    answers = [[f"The capital of {s.subject} is {c}." for c in capitals] for s in facts]
    return facts, capitals, answers


def fact_judgement(run_dir: Path) -> dict:
    """{"right_above_every_wrong", "wrong_below_right", "margin"} of RUN_DIR's reward model."""
    facts, capitals, answers = capital_answers()
    scores = judge_responses(reward_judge(run_dir), [s.text for s in facts], {"answers": answers})
    above_all, below, margins = [], [], []
    for spec, row in zip(facts, scores[REWARD_MODEL]["answers"], strict=True):
        by_capital = dict(zip(capitals, row, strict=True))
        right = by_capital.pop(spec.answer)
        above_all.append(right > max(by_capital.values()))
        below += [wrong < right for wrong in by_capital.values()]
        margins.append(right - max(by_capital.values()))
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
