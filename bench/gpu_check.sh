#!/usr/bin/env bash
# The first commands a GPU user runs: the lesson's QLoRA recipe on one CUDA GPU, end to end,
# with what CPU tests cannot prove (docs/gpu.md). Run it before taking the mistral-7b-qlora
# preset to a cluster.
#
#   bench/gpu_check.sh [MODEL] [OUTPUT_DIR]
#
# MODEL: a Hugging Face model id or local directory of a small causal LM whose head size vLLM
# supports (default: Qwen/Qwen2.5-0.5B, 896 wide, 14 heads of 64; its tokenizer pads with EOS,
# which rlhf-ray accepts; any Mistral or Llama-family model works, Mistral-7B itself fits one
# 24 GB GPU in 4-bit). Needs `pip install torch "rlhf-ray[vllm]"` on a CUDA machine and the model
# in the Hugging Face cache or a local path (nothing is downloaded with HF_HUB_OFFLINE=1).
#
# What it does, on a Ray cluster of two nodes on this machine, as cluster.yaml lays one out:
# a head with no GPU (`ray start --head --num-gpus 0`), where the driver runs with no CUDA
# device visible, and a worker node with the GPU, where every role runs, sharing it:
#   1. all three phases of the preset's settings (4-bit nf4 base with bf16 compute, LoRA r=8
#      alpha=32 on q_proj/v_proj, vLLM rollouts with adapter-only sync, tis) on a short
#      schedule; the driver is SIGKILLed once PPO's step-2 checkpoint exists, and the rerun
#      resumes after it (the checkpoint went from the GPU learner to the GPU-less driver);
#   2. PPO again with each critic-free estimator (rloo, grpo, reinforce++), a few steps each;
#   3. checks of what the runs wrote: every PPO step logged once, the rollouts came from vLLM
#      and every synced adapter reached it (learner vs vLLM logprob gap, version lag 0), each
#      sync moved the LoRA adapter only, KL at step 1 near 0, the gold judge's summary.
set -euo pipefail
MODEL=${1:-Qwen/Qwen2.5-0.5B}
OUT=${2:-runs/gpu-check}
PORT=${RAY_PORT:-6390}
python - <<'EOF'
import torch, vllm  # noqa: E401  fail early, with the reason, where either is missing
assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
print(f"torch {torch.__version__}, vLLM {vllm.__version__}, {torch.cuda.get_device_name(0)}")
EOF

# --- the cluster: a GPU-less head and a GPU worker node, token authentication on -------------
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(python -c "import secrets; print(secrets.token_hex(32))")}
ray stop --force >/dev/null 2>&1 || true
ray start --head --port="$PORT" --num-gpus 0 --num-cpus 2 --dashboard-host=127.0.0.1 >/dev/null
ray start --address="127.0.0.1:$PORT" --num-gpus 1 --num-cpus 8 >/dev/null
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
export RAY_ADDRESS="127.0.0.1:$PORT"

# The driver as on a CPU-only head: no CUDA device visible to it
driver() { CUDA_VISIBLE_DEVICES="" rlhf-ray run "$@"; }
SETTINGS=(
  --config mistral-7b-qlora --model.name_or_path "$MODEL" --run.output_dir "$OUT"
  --rollout.engine vllm --rollout.gpu_memory_utilization 0.3
  --resources.train_workers 1 --resources.train_worker_cpus 2 --resources.train_worker_gpus 1
  --resources.rollout_cpus 1 --resources.rollout_gpus 0.4
  --resources.reward_cpus 1 --resources.reward_gpus 0.2
  --resources.reference_cpus 1 --resources.reference_gpus 0.2
  --resources.learner_cpus 1 --resources.learner_gpus 0.2
  --ppo.num_rollout_actors 1 --ppo.steps 12 --ppo.checkpoint_every 2
  --data.num_sft 256 --data.num_preferences 512 --data.num_prompts 640
  --eval.samples_per_prompt 2
)

# --- 1. every phase; the driver killed after PPO's step-2 checkpoint, then resumed -----------
driver "${SETTINGS[@]}" &
DRIVER=$!
until [ -e "$OUT/ppo_checkpoints/step-2/COMPLETE" ] || ! kill -0 "$DRIVER" 2>/dev/null; do
  sleep 2
done
kill -0 "$DRIVER" 2>/dev/null || { wait "$DRIVER"; echo "the run ended before step 2"; exit 1; }
kill -KILL "$DRIVER"
wait "$DRIVER" || true
echo "driver SIGKILLed after the step-2 checkpoint; resuming"
driver "${SETTINGS[@]}"

# --- 2. PPO with each critic-free estimator, on the same SFT and reward models -----------------
# (--run.redo ppo deletes the PPO phase's outputs, its metrics log included: keep each one)
cp "$OUT/metrics/ppo.jsonl" "$OUT/metrics/ppo-gae.jsonl"
cp "$OUT/summary.json" "$OUT/summary-gae.json"
for ESTIMATOR in rloo grpo reinforce++; do
  driver "${SETTINGS[@]}" --run.redo ppo --run.evaluate false --ppo.steps 3 \
    --ppo.estimator "$ESTIMATOR" --ppo.samples_per_prompt 4
  cp "$OUT/metrics/ppo.jsonl" "$OUT/metrics/ppo-$ESTIMATOR.jsonl"
done

# --- 3. what the runs wrote -----------------------------------------------------------------
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from safetensors import safe_open

out = Path(sys.argv[1])
def rows(name):
    return [json.loads(line) for line in (out / "metrics" / name).open() if line.strip()]

gae = rows("ppo-gae.jsonl")
steps = [r["step"] for r in gae]
assert steps == list(range(1, 13)), f"PPO steps logged {steps}: expected 1..12 once each"
gap_mean = max(r["rollout/logprob_gap_mean"] for r in gae)
gap_max = max(r["rollout/logprob_gap_max"] for r in gae)
lag = max(r["rollout/staleness_max"] for r in gae)
adapter = out / "policy" / "adapter" / "adapter_model.safetensors"
with safe_open(str(adapter), "pt") as f:  # the policy's adapter, stacked onto the base if SFT was LoRA
    stacked = sum(f.get_tensor(k).numel() for k in f.keys())
synced = {r["perf/sync_bytes"] for r in gae}
print(f"gae: steps 1..12 once each across the kill; version lag at most {lag}")
print(f"KL at step 1: {gae[0]['objective/kl']:.2e}; ratio_first {gae[0]['val/ratio_first']:.6f}")
print(f"learner vs vLLM logprob gap: mean at most {gap_mean:.4f}, max token {gap_max:.3f}")
print(f"bytes per sync: {sorted(synced)} (the policy's stacked adapter holds {stacked} parameters)")
for estimator in ("rloo", "grpo", "reinforce++"):
    last = rows(f"ppo-{estimator}.jsonl")[-1]
    print(f"{estimator}: {last['step']} steps, objective/scores {last['objective/scores']:.3f}, "
          f"KL {last['objective/kl']:.3f}")
    assert last["step"] == 3
summary = json.loads((out / "summary-gae.json").read_text())
for key in ("win_rate_vs_sft", "gap_closed", "kl_heldout", "kl_last_step", "ppo_stage_seconds", "phase_seconds"):
    print(f"{key}: {summary.get(key)}")
assert lag == 0, "a batch was sampled with an older adapter than the learner's"
assert gap_mean < 0.1, "vLLM's logprobs are far from the learner's: did the adapter reach it?"
assert abs(gae[0]["objective/kl"]) < 0.05, "KL at step 1 is not near 0: policy != reference?"
print("OK")
EOF
