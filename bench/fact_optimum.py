"""How far PPO took the policy towards the optimum of its objective, on the capital facts.

    .venv/bin/python bench/fact_optimum.py RUN_DIR BETA

PPO maximises the reward model's score minus beta times the KL to the SFT model; over any set
of answers its optimum is pi_sft(a) * exp(r(a) / beta), renormalised. For each of the synthetic
world's 48 fact prompts this scores the 12 answers "The capital of X is Y." with RUN_DIR's SFT
model, policy and reward model, and prints, for the prompts PPO trained on and for the
held-out ones apart: the share of the capital answers' probability on the right one under the
SFT model, the policy and that optimum (at BETA: the run's `objective/kl_coef` at its best
step), and the policy's probability of answering with any capital answer at all.
A policy at the optimum cannot learn more facts from this reward model at this beta; one short
of it on the training prompts is limited by the optimisation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# after bench/ is on the path (it puts the checkout there too)
import torch  # noqa: E402
from fact_judge import capital_answers, reward_judge  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rlhf_ray.config.command_line import parse_run_args  # noqa: E402
from rlhf_ray.data.encoding import completion_ids, prompt_ids  # noqa: E402
from rlhf_ray.data.prepare import limits_of  # noqa: E402
from rlhf_ray.run.checkpoints import is_complete  # noqa: E402
from rlhf_ray.run.judges import REWARD_MODEL, judge_responses  # noqa: E402


def answer_logprobs(model, tok, limits, prompt: str, answers: list[str]) -> torch.Tensor:
    """[answers] log pi(answer | prompt), each answer encoded as PPO's rollouts are."""
    prompt_part = prompt_ids(tok, prompt, limits)
    out = []
    for answer in answers:
        ids = torch.tensor([prompt_part + completion_ids(tok, prompt, answer, limits)])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1)  # [T-1, V]
        targets = ids[0, 1:]
        token_logp = logp[torch.arange(len(targets)), targets]
        out.append(token_logp[len(prompt_part) - 1 :].sum())
    return torch.stack(out)


def optimum_report(run_dir: Path, beta: float) -> dict:
    judge = reward_judge(run_dir)  # refuses a run without config.yaml or a complete reward/
    for name in ("sft", "policy"):
        if not is_complete(run_dir / name):
            raise SystemExit(f"{run_dir}: no complete {name}/ (a run whose PPO phase is done)")
    cfg = parse_run_args(["--config", str(run_dir / "config.yaml")])
    limits = limits_of(cfg.data)
    tok = AutoTokenizer.from_pretrained(run_dir / "sft")
    models = {
        name: AutoModelForCausalLM.from_pretrained(run_dir / name).eval()
        for name in ("sft", "policy")
    }
    lines = (run_dir / "data" / "prompts.jsonl").read_text().splitlines()
    trained = {json.loads(line)["prompt"] for line in lines}
    facts, capitals, answers = capital_answers()
    scores = judge_responses(judge, [s.text for s in facts], {"a": answers})
    sums = {split: [0, 0.0, 0.0, 0.0, 0.0] for split in ("trained", "held_out")}
    for spec, row, rewards in zip(facts, answers, scores[REWARD_MODEL]["a"], strict=True):
        logp = {n: answer_logprobs(m, tok, limits, spec.text, row) for n, m in models.items()}
        right = capitals.index(spec.answer)
        optimum = (logp["sft"] + torch.tensor(rewards) / beta).softmax(0)
        acc = sums["trained" if spec.text in trained else "held_out"]
        acc[0] += 1
        acc[1] += logp["sft"].softmax(0)[right].item()
        acc[2] += logp["policy"].softmax(0)[right].item()
        acc[3] += optimum[right].item()
        acc[4] += logp["policy"].exp().sum().item()
    return {
        split: {
            "prompts": n,
            "right_share_sft": round(sft / n, 3),
            "right_share_policy": round(policy / n, 3),
            "right_share_optimum": round(opt / n, 3),
            "policy_capital_answer_mass": round(mass / n, 3),
        }
        for split, (n, sft, policy, opt, mass) in sums.items()
        if n
    }


def main() -> None:
    torch.set_num_threads(1)
    try:
        run_dir, beta = Path(sys.argv[1]), float(sys.argv[2])
    except (IndexError, ValueError):
        raise SystemExit("usage: bench/fact_optimum.py RUN_DIR BETA (beta: a number > 0)") from None
    if beta <= 0:
        raise SystemExit(f"BETA must be > 0, got {beta}")
    print(json.dumps({"run": str(run_dir), "beta": beta, **optimum_report(run_dir, beta)}))


if __name__ == "__main__":
    main()
