"""The rollout generator's two engines on the same model and prompts: Hugging Face `generate`
against vLLM, side by side.

    make .venv-vllm/.installed            # vLLM's CPU build beside the project (see Makefile)
    .venv-vllm/bin/python bench/engines.py --models runs/default [--rounds 3] [--batches 6]

`--models` is a finished run of the default preset (its `sft/` and `data/`). Each engine runs
as rlhf-ray's HFGeneratorCore runs it (the policy's LoRA adapter loaded from the learner's
tensors, sampling at temperature 1, its logprobs taken), in its own process on `--threads`
torch threads, sampling `--batches` batches of 64 prompts; the engines alternate within a
round. Reported: medians over rounds of each run's median batch (the first batch, with its
warm-up, left out) as completions/s and response tokens/s (real tokens up to EOS), the seconds
an adapter sync takes, and vLLM's ratio to HF. `--vllm-preload LIB` starts the vLLM process with
LD_PRELOAD=LIB (vLLM's CPU docs advise Intel OpenMP, `.venv-vllm/lib/libiomp5.so`, and
tcmalloc). Nothing here is asserted in a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ENGINES = ("hf", "vllm")
BATCH, TEMPERATURE = 64, 1.0


def measure(engine: str, models: Path, batches: int, threads: int) -> dict:
    """One engine's generator: per-batch seconds and tokens, and the seconds of one sync."""
    import torch

    from jobs.ppo.roles import engine_settings, policy_settings
    from rlhf_ray.config.command_line import parse_run_args
    from rlhf_ray.data.jsonl import read_jsonl
    from rlhf_ray.ppo.learner import LearnerCore
    from rlhf_ray.ppo.rollout_generator import HFGeneratorCore
    from rlhf_ray.ppo.settings import LearnerSettings
    from rlhf_ray.ppo.vllm_generator import VllmGeneratorCore

    argv = ["--config", "default", "--run.output_dir", str(models), "--rollout.engine", engine]
    cfg = parse_run_args([*argv, "--ppo.temperature", str(TEMPERATURE)])
    policy = policy_settings(cfg, models)
    policy = type(policy)(**{**vars(policy), "cpus": threads})
    weights = LearnerCore(LearnerSettings(policy, str(models / "sft"), "full", cfg.ppo)).weights()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    generator = (
        HFGeneratorCore(policy, rank=0)
        if engine == "hf"
        else VllmGeneratorCore(policy, engine_settings(cfg), rank=0)
    )
    startup_s = time.perf_counter() - start
    start = time.perf_counter()
    generator.load_weights(weights)
    sync_s = time.perf_counter() - start
    prompts = [r["prompt"] for r in read_jsonl(models / "data" / "prompts.jsonl")]
    seconds, tokens = [], []
    for i in range(batches):
        chunk = prompts[i * BATCH : (i + 1) * BATCH]
        start = time.perf_counter()
        batch = generator.generate(chunk, list(range(len(chunk))))
        seconds.append(time.perf_counter() - start)
        tokens.append(int(batch.response_mask.sum()))
    steady = slice(1, None)  # the first batch warms up
    return {
        "startup_s": startup_s,
        "sync_s": sync_s,
        "completions_per_s": statistics.median(BATCH / s for s in seconds[steady]),
        "tokens_per_s": statistics.median(
            t / s for t, s in zip(tokens[steady], seconds[steady], strict=True)
        ),
        "first_batch_s": seconds[0],
    }


def report(results: dict[str, list[dict]], threads: int) -> str:
    def median(engine: str, key: str) -> float:
        return statistics.median(r[key] for r in results[engine])

    lines = [
        "| engine | completions/s | response tokens/s | start s | first batch s | sync s |",
        "|---|---|---|---|---|---|",
    ]
    for engine in results:
        cells = ["completions_per_s", "tokens_per_s", "startup_s", "first_batch_s", "sync_s"]
        values = [median(engine, c) for c in cells]
        lines.append(
            f"| {engine} | {values[0]:.0f} | {values[1]:.0f} | {values[2]:.1f} | "
            f"{values[3]:.2f} | {values[4]:.3f} |"
        )
    if set(ENGINES) <= set(results):
        ratio = median("vllm", "tokens_per_s") / median("hf", "tokens_per_s")
        lines.append(f"\nvLLM / HF response tokens per second: {ratio:.2f}x ({threads} threads)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engines", nargs="*", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--vllm-preload", default="", help="LD_PRELOAD of the vLLM process")
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # one, in-process
    args = parser.parse_args()
    models = args.models.resolve()
    if args.engine:
        print(json.dumps(measure(args.engine, models, args.batches, args.threads)))
        return
    results: dict[str, list[dict]] = {e: [] for e in args.engines}
    for round_ in range(args.rounds):
        for engine in args.engines:
            command = [sys.executable, __file__, "--models", str(models), "--engine", engine]
            command += ["--batches", str(args.batches), "--threads", str(args.threads)]
            env = dict(os.environ)
            if engine == "vllm" and args.vllm_preload:
                env["LD_PRELOAD"] = args.vllm_preload
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
            if done.returncode != 0:
                sys.exit(f"{engine} failed:\n{done.stderr[-3000:]}")
            results[engine].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}: {engine} {results[engine][-1]}", flush=True)
    (models / "engines.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(results, args.threads))


if __name__ == "__main__":
    main()
