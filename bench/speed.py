"""rlhf-ray's RL phase against TRL's single-process trainers on the same work, side by side.

    .venv/bin/pip install -e ".[bench]"                     # TRL 1.16, for the bench only
    .venv/bin/python bench/speed.py --models runs/bench-estimators/gae [--rounds 3] [--steps 10]

`--models` is a finished run of the default preset (its `sft/`, `reward/` and `data/`), e.g.
the `gae` run of bench/estimators.py. Every system trains the same SFT model against the same
reward model on the same prompts: 64 completions per step (16 prompts x 4 samples; PPO with
its critic takes 64 prompts x 1), at most 32 new tokens at temperature 1, KL coefficient 0.1,
the default preset's LoRA adapter (r=8, alpha=32, all linear layers, no dropout), one policy
epoch over one minibatch. Each system runs in its own process, the systems alternate within a
round, and the table gives medians over rounds of each run's median steady-state step (the
first step, with its warm-up, is left out). Also measured: rlhf-ray's rollout generator against
a bare KV-cache decode loop of the same model, both on one thread. Nothing here is asserted in
a test; the last table is in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COMPLETIONS, SAMPLES, MAX_NEW, TEMPERATURE, KL = 64, 4, 32, 1.0, 0.1
OURS = ("rloo", "grpo", "reinforce++", "gae")
THREADS = (
    f"Cores: {os.cpu_count()}. rlhf-ray: a local Ray of 2 CPUs, four roles in four processes of "
    "one torch thread each (score and reference run at once, so their shares overlap); TRL: one "
    "process, two torch threads; decode: one thread."
)
SYSTEMS = (*(f"rlhf-ray-{e}" for e in OURS), "trl-rloo", "trl-grpo", "decode")


def ours(models: Path, estimator: str, steps: int, extra: list[str], nodes: int) -> dict:
    """rlhf-ray's four roles on a local Ray of 2 CPUs, or on `nodes` simulated nodes sharing
    those 2 CPUs (ray.cluster_utils.Cluster; each node has its own object store, so batches
    cross between nodes as on a cluster); per-step wall time, stage times, busy shares."""
    from bench.ray_setup import timed_ppo_steps
    from rlhf_ray.config.command_line import parse_run_args

    k = 1 if estimator == "gae" else SAMPLES
    args = ["--output_dir", str(models), "--ppo.estimator", estimator]
    args += ["--ppo.samples_per_prompt", str(k), "--ppo.rollouts_per_step", str(COMPLETIONS)]
    args += ["--ppo.minibatch_size", str(COMPLETIONS), "--ppo.epochs", "1", "--ppo.kl_coef"]
    args += [str(KL), "--ppo.steps", str(steps), "--ppo.checkpoint_every", "0", *extra]
    timed = timed_ppo_steps(parse_run_args(args), models, nodes)
    seconds, stages, busy = timed.seconds, timed.stages, timed.busy
    steady = seconds[1:]
    step_s = statistics.median(steady)
    share = {s: statistics.median(t[s] for t in stages[1:]) / step_s for s in stages[0]}
    return {
        "completions_per_s": COMPLETIONS / step_s,
        "step_s": step_s,
        "stage_share": share,
        "role_busy": {role: b / sum(steady) for role, b in busy.items()},
    }


def trl(models: Path, kind: str, steps: int) -> dict:
    """TRL's RLOOTrainer or GRPOTrainer in this process, on 2 threads."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from rlhf_ray.config.loading import load_config
    from rlhf_ray.data.jsonl import read_jsonl

    torch.set_num_threads(2)
    cfg = load_config("default")
    tok = AutoTokenizer.from_pretrained(models / "sft")
    tok.padding_side = "left"
    template = cfg.data.prompt_template
    rows = read_jsonl(models / "data" / "prompts.jsonl")
    prompts = Dataset.from_dict({"prompt": [template.format(prompt=r["prompt"]) for r in rows]})
    reward = AutoModelForSequenceClassification.from_pretrained(models / "reward", num_labels=1)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=0.0,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )

    class StepTimer(TrainerCallback):
        seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    config, trainer = {"rloo": (RLOOConfig, RLOOTrainer), "grpo": (GRPOConfig, GRPOTrainer)}[kind]
    with tempfile.TemporaryDirectory() as out:
        args = config(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=COMPLETIONS,
            gradient_accumulation_steps=1,
            num_generations=SAMPLES,
            max_completion_length=MAX_NEW,
            temperature=TEMPERATURE,
            top_p=1.0,
            top_k=0,
            beta=KL,
            num_iterations=1,
            learning_rate=cfg.ppo.lr,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            seed=0,
        )
        timer = StepTimer()
        trainer(
            model=str(models / "sft"),
            reward_funcs=reward,
            args=args,
            train_dataset=prompts,
            processing_class=tok,
            reward_processing_classes=tok,
            peft_config=lora,
            callbacks=[timer],
        ).train()
    step_s = statistics.median(timer.seconds[1:])
    return {"completions_per_s": COMPLETIONS / step_s, "step_s": step_s}


def decode(models: Path, steps: int) -> dict:
    """Tokens per second on one thread: rlhf-ray's rollout generator (sampling, then the
    logprobs of what it sampled) against a bare KV-cache loop sampling as many tokens."""
    import torch

    from rlhf_ray.config.loading import load_config
    from rlhf_ray.data.encoding import pad_left, prompt_ids
    from rlhf_ray.data.jsonl import read_jsonl
    from rlhf_ray.data.prepare import limits_of
    from rlhf_ray.ppo.rollout_generator import HFGeneratorCore
    from rlhf_ray.ppo.settings import PolicySettings

    cfg = load_config("default")
    policy = PolicySettings(
        str(models / "sft"), cfg.model, cfg.quantization, cfg.lora, limits_of(cfg.data),
        TEMPERATURE, 1, 0, 0,
    )  # fmt: skip
    generator = HFGeneratorCore(policy, rank=0)
    generator.version = 0  # the fresh adapter is the learner's version 0
    torch.set_num_threads(1)
    rows = read_jsonl(models / "data" / "prompts.jsonl")[:COMPLETIONS]
    prompts = [r["prompt"] for r in rows]
    ours_s, bare_s, tokens = [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        batch = generator.generate(prompts, list(range(len(prompts))))
        ours_s.append(time.perf_counter() - start)
        width = batch.response.shape[1]  # decode steps taken (until every row hit EOS)
        tokens.append(width * len(prompts))
        ids = [prompt_ids(generator.tok, p, policy.limits) for p in prompts]
        query, mask = pad_left(ids, generator.tok.pad_token_id)
        start = time.perf_counter()
        _bare_decode(generator.policy, query, mask, width)
        bare_s.append(time.perf_counter() - start)
    per_token = [t / s for t, s in zip(tokens, ours_s, strict=True)]
    bare_per_token = [t / s for t, s in zip(tokens, bare_s, strict=True)]
    return {
        "generator_tokens_per_s": statistics.median(per_token[1:]),
        "bare_tokens_per_s": statistics.median(bare_per_token[1:]),
    }


def _bare_decode(model, query, mask, steps: int) -> None:
    """Sample `steps` tokens for every row with the KV cache: one forward per token."""
    import torch

    with torch.no_grad():
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=query, attention_mask=mask, position_ids=positions, use_cache=True)
        for _ in range(steps):
            probs = torch.softmax(out.logits[:, -1].float() / TEMPERATURE, -1)
            token = torch.multinomial(probs, 1)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=token,
                attention_mask=mask,
                position_ids=positions,
                cache=out.cache,
                use_cache=True,
            )


def run_one(system: str, models: Path, steps: int, extra: list[str], nodes: int) -> dict:
    if system.startswith("rlhf-ray-"):
        return ours(models, system.removeprefix("rlhf-ray-"), steps, extra, nodes)
    if system.startswith("trl-"):
        return trl(models, system.removeprefix("trl-"), steps)
    return decode(models, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument(
        "--ours",
        default="",
        help='more rlhf-ray settings for its runs, e.g. "--ppo.overlap true" (quoted)',
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=SETTINGS",
        help="also run each rlhf-ray system with these settings (after --ours), in the same "
        'rounds, e.g. "k2=--ppo.overlap true --ppo.max_policy_lag 2"; may be repeated',
    )
    parser.add_argument(
        "--nodes", type=int, default=1, help="rlhf-ray on this many simulated nodes (2 CPUs in all)"
    )
    parser.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)  # one, in-process
    args = parser.parse_args()
    models = args.models.resolve()
    if args.system:
        result = run_one(args.system, models, args.steps, args.ours.split(), args.nodes)
        print(json.dumps(result))
        return
    runs = list(with_variants(args.systems, args.ours, args.variant))
    results: dict[str, list[dict]] = {name: [] for name, _, _ in runs}
    for round_ in range(args.rounds):
        for name, system, ours_settings in runs:
            command = [sys.executable, __file__, "--models", str(models), "--system", system]
            command += ["--ours", ours_settings] if ours_settings else []
            command += ["--nodes", str(args.nodes)]
            done = subprocess.run(
                [*command, "--steps", str(args.steps)], capture_output=True, text=True, cwd=REPO
            )
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}: {name} {results[name][-1]}", flush=True)
    (models.parent / "speed.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


def with_variants(systems: list[str], ours: str, variants: list[str]):
    """(name in the table, system, rlhf-ray settings) for every run of a round: each rlhf-ray
    system as given and once per `LABEL=SETTINGS` variant, named `system [LABEL]`."""
    for system in systems:
        if not system.startswith("rlhf-ray-"):
            yield system, system, ""
            continue
        yield system, system, ours
        for variant in variants:
            label, sep, settings = variant.partition("=")
            if not sep or not label:
                sys.exit(f"--variant {variant!r}: expected LABEL=SETTINGS")
            yield f"{system} [{label}]", system, f"{ours} {settings}".strip()


def roles(results: dict[str, list[dict]]) -> list[str]:
    """Every role name any rlhf-ray run reported, learner first."""
    names = {role for runs in results.values() for r in runs for role in r.get("role_busy", {})}
    return sorted(names, key=lambda n: (not n.startswith("learner"), n))


def share_table(results: dict[str, list[dict]], title: str, key: str, columns: list[str]) -> list:
    """Markdown rows: each rlhf-ray system's median over rounds of `r[key][column]`."""
    systems = [s for s in results if s.startswith("rlhf-ray-")]
    lines = ["", f"| {title} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for system in systems:
        cells = [statistics.median(r[key].get(c, 0.0) for r in results[system]) for c in columns]
        lines.append(f"| {system} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return lines


def report(results: dict[str, list[dict]]) -> str:
    from rlhf_ray.run.metrics import STAGES

    def median(system: str, key: str) -> float:
        return statistics.median(r[key] for r in results[system])

    lines = ["| system | completions/s | step s | vs TRL RLOO |", "|---|---|---|---|"]
    base = median("trl-rloo", "completions_per_s") if "trl-rloo" in results else None
    for system in results:
        if system == "decode":
            continue
        rate = median(system, "completions_per_s")
        ratio = f"{rate / base:.2f}x" if base else "-"
        lines.append(f"| {system} | {rate:.0f} | {median(system, 'step_s'):.2f} | {ratio} |")
    if any(s.startswith("rlhf-ray-") for s in results):
        lines += share_table(
            results, "rlhf-ray step: share of wall time", "stage_share", list(STAGES)
        )
        lines += share_table(results, "rlhf-ray role: share busy", "role_busy", roles(results))
    lines += ["", THREADS]
    if "decode" in results:
        gen = median("decode", "generator_tokens_per_s")
        bare = median("decode", "bare_tokens_per_s")
        lines.append(
            f"\nrollout generator {gen:.0f} tokens/s, bare KV-cache loop {bare:.0f} tokens/s "
            f"(one thread): {bare / gen:.2f}x"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
