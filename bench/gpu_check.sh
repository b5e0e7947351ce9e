#!/usr/bin/env bash
# The lesson's QLoRA recipe on one GPU, end to end, with the vLLM rollout engine: a check a
# person with one CUDA GPU runs before taking the mistral-7b-qlora preset to a cluster.
#
#   bench/gpu_check.sh [MODEL] [OUTPUT_DIR]
#
# MODEL: a Hugging Face model id or local directory of a small causal LM whose head size vLLM
# supports (default: Qwen/Qwen2.5-0.5B, 896 wide, 14 heads of 64; any Mistral or Llama-family
# model works; Mistral-7B itself fits one 24 GB GPU in 4-bit too). It runs the preset's
# settings (4-bit nf4 base with bf16 compute, LoRA r=8 alpha=32 on q_proj/v_proj, adapter-only
# sync; vLLM holds the base in 4-bit where it has bitsandbytes, else in bf16: vLLM 0.32 dropped
# it) with every role sharing the one GPU, on a short schedule, with truncated importance
# sampling on, then checks what the run wrote:
#   - the rollouts came from vLLM, and every synced adapter reached it: per step, the learner's
#     logprobs of the sampled tokens are close to vLLM's (rollout/logprob_gap_mean: the
#     difference of two precisions of one model, far below what a stale or missing adapter
#     gives), and the policy version lag is 0;
#   - each sync moved the LoRA adapter only (perf/sync_bytes, against the policy's adapter file);
#   - the gold judge's summary (win rate, gap closed) and the stage seconds.
# Needs: pip install "torch" "rlhf-ray[vllm]" on a CUDA machine, and the model in the Hugging
# Face cache or a local path (nothing is downloaded if HF_HUB_OFFLINE=1).
set -euo pipefail
MODEL=${1:-Qwen/Qwen2.5-0.5B}
OUT=${2:-runs/gpu-check}
python - <<'EOF'
import torch, vllm  # noqa: E401  fail early, with the reason, where either is missing
assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
print(f"torch {torch.__version__}, vLLM {vllm.__version__}, {torch.cuda.get_device_name(0)}")
EOF
rlhf-ray run --config mistral-7b-qlora \
  --model.name_or_path "$MODEL" --run.output_dir "$OUT" \
  --rollout.engine vllm --rollout.gpu_memory_utilization 0.3 --rollout.logprob_correction tis \
  --resources.train_workers 1 --resources.train_worker_cpus 2 --resources.train_worker_gpus 1 \
  --resources.rollout_cpus 1 --resources.rollout_gpus 0.4 \
  --resources.reward_cpus 1 --resources.reward_gpus 0.2 \
  --resources.reference_cpus 1 --resources.reference_gpus 0.2 \
  --resources.learner_cpus 1 --resources.learner_gpus 0.2 \
  --ppo.num_rollout_actors 1 --ppo.steps 20 \
  --data.num_sft 256 --data.num_preferences 512 --data.num_prompts 640 \
  --eval.samples_per_prompt 2
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from safetensors import safe_open

out = Path(sys.argv[1])
rows = [json.loads(line) for line in (out / "metrics" / "ppo.jsonl").open()]
steps = [r for r in rows if "rollout/logprob_gap_mean" in r]
assert steps, "no rollout/logprob_gap_* in metrics/ppo.jsonl: the rollouts did not come from vLLM"
gap_mean = max(r["rollout/logprob_gap_mean"] for r in steps)
gap_max = max(r["rollout/logprob_gap_max"] for r in steps)
lag = max(r["policy/version_lag"] for r in steps)
adapter = out / "policy" / "adapter" / "adapter_model.safetensors"
with safe_open(str(adapter), "pt") as f:  # the policy's adapter, stacked onto the base if SFT was LoRA
    stacked = sum(f.get_tensor(k).numel() for k in f.keys())
synced = {r["perf/sync_bytes"] for r in steps}
summary = json.loads((out / "summary.json").read_text())
print(f"steps on vLLM: {len(steps)}; version lag at most {lag}")
print(f"learner vs vLLM logprob gap: mean at most {gap_mean:.4f}, max token {gap_max:.3f}")
print(f"bytes per sync: {sorted(synced)} (the policy's stacked adapter holds {stacked} parameters)")
for key in ("win_rate_vs_sft", "gap_closed", "kl_final", "ppo_stage_seconds", "phase_seconds"):
    print(f"{key}: {summary.get(key)}")
assert lag == 0, "a batch was sampled with an older adapter than the learner's"
assert gap_mean < 0.1, "vLLM's logprobs are far from the learner's: did the adapter reach it?"
print("OK")
EOF
