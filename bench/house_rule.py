"""A user's own preference data carrying a rule of its own: does the PPO policy keep to it?

    .venv/bin/python bench/house_rule.py [--config default] [--out runs/bench-house-rule]
        [--seed N] [-- extra run options]

The data are a user's files (`data.sft_path`, `preference_path`, `prompt_path`,
`eval_prompt_path`), written from the synthetic world with a house rule the gold judge knows
nothing of: every answer opens with "Answer:". Demonstrators keep the rule half the time;
labellers score a response by the gold judge plus RULE_WORTH when it keeps the rule (as much as
being correct is worth) and prefer the higher, flipped at `data.label_noise` like the built-in
pairs. So the rule reaches the policy through the demonstrations (half keep it) and the reward
model, as a team's own conventions would.

The check is `follows_house_rule`, named in `eval.judges`: the share of the base's, SFT's and
the policy's held-out answers that keep the rule, beside the gold judge's figures (the prompts
are the world's, so the gold judge knows them). Prints one JSON line with both.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# after the checkout is on the path
from rlhf_ray.config.command_line import parse_run_args  # noqa: E402
from rlhf_ray.data.chat import response_text  # noqa: E402
from rlhf_ray.data.jsonl import write_jsonl  # noqa: E402
from rlhf_ray.world import assistant_world  # noqa: E402
from rlhf_ray.world.dataset_rows import labelled_pair, split_prompts  # noqa: E402
from rlhf_ray.world.gold_judge import GoldJudge  # noqa: E402

RULE = "Answer:"
KEEPS_RULE = 0.5  # the share of demonstrations (and of each pair's responses) that keep it
RULE_WORTH = 1.0  # what keeping the rule adds to the gold judge's score, for the labellers
JUDGE = "bench.house_rule:follows_house_rule"


def follows_house_rule(prompts, completions, **kwargs) -> list[float]:
    """1.0 for each completion (text, or an assistant message list) opening with RULE."""
    return [float(response_text(c).lstrip().startswith(RULE)) for c in completions]


def _maybe_ruled(text: str, rng: random.Random) -> str:
    return f"{RULE} {text}" if rng.random() < KEEPS_RULE else text


def _preference(spec, data, judge: GoldJudge, rng: random.Random) -> dict | None:
    """A pair of demonstrator responses labelled by gold score + RULE_WORTH if it keeps the
    rule, or None for a tie; flipped at data.label_noise."""
    a, b = (
        _maybe_ruled(assistant_world.sample_response(spec, data.flawed_fraction, rng, True), rng)
        for _ in range(2)
    )
    scores = tuple(
        judge.score(spec.text, t).total + RULE_WORTH * t.startswith(RULE) for t in (a, b)
    )
    return labelled_pair(spec.text, (a, b), scores, data.label_noise, rng)


def write_user_data(folder: Path, data, seed: int) -> dict[str, Path]:
    """The four files of a user's run, sized as `data` (a DataConfig) says -> option: path."""
    train, held_out = split_prompts(data.num_eval_prompts, seed)
    rng, judge = random.Random(seed), GoldJudge()
    sft = []
    for _ in range(data.num_sft):
        spec = rng.choice(train)
        text = assistant_world.sample_response(spec, data.flawed_fraction, rng)
        sft.append({"prompt": spec.text, "completion": _maybe_ruled(text, rng)})
    pairs = []
    while len(pairs) < data.num_preferences:
        pair = _preference(rng.choice(train), data, judge, rng)
        pairs += [pair] if pair else []
    rows = {
        "sft_path": sft,
        "preference_path": pairs,
        "prompt_path": [{"prompt": rng.choice(train).text} for _ in range(data.num_prompts)],
        "eval_prompt_path": [{"prompt": s.text} for s in held_out],
    }
    folder.mkdir(parents=True, exist_ok=True)
    for option, content in rows.items():
        write_jsonl(folder / f"{option}.jsonl", content)
    return {option: folder / f"{option}.jsonl" for option in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-house-rule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("extra", nargs="*", help="more run options, after --")
    args = parser.parse_args()
    data = parse_run_args(["--config", args.config]).data
    files = write_user_data(args.out / "user-data", data, args.seed)
    run_dir = args.out / f"seed-{args.seed}"
    command = [sys.executable, "jobs/rlhf.py", "--config", args.config]
    command += ["--output_dir", str(run_dir), "--run.seed", str(args.seed)]
    command += [arg for option, path in files.items() for arg in (f"--data.{option}", str(path))]
    command += ["--eval.judges", "reward_model", JUDGE, "--run.progress_bar", "false"]
    subprocess.run([*command, *args.extra], cwd=REPO, check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    shares = {model: summary[f"{JUDGE}_reward_{model}"] for model in ("base", "sft", "policy")}
    gold = ("win_rate_vs_sft", "gap_closed", "kl_heldout")
    print(json.dumps({"house_rule_share": shares, **{k: summary.get(k) for k in gold}}))


if __name__ == "__main__":
    main()
