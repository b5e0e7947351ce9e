"""One frozen, validated dataclass per concern, and the `Config` that groups them.

Each component receives only the section it needs (e.g. the SFT loop gets `SFTConfig`), never
the whole `Config`. Validation raises `ConfigError` naming `section.key`, the value and what is
allowed. The comment on each field is its one-line description in `rlhf-ray run --help`.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field, fields
from typing import ClassVar

from rlhf_ray.config.rollout import (
    VLLM_CPU_HEAD_SIZES,
    VLLM_MAX_LORA_RANK,
    RolloutConfig,
    resolved_logprob_source,
)
from rlhf_ray.config.section import Section
from rlhf_ray.errors import ConfigError
from rlhf_ray.ppo import staleness
from rlhf_ray.world.assistant_world import max_eval_prompts

EMBEDDED_MODEL = "embedded"
PHASES = ("sft", "reward", "ppo")
DTYPES = ("float32", "bfloat16", "float16")
TRAIN_METHODS = ("full", "lora")
# How PPO estimates advantages: GAE with a critic, or a critic-free baseline (ppo/estimators.py)
ESTIMATORS = ("gae", "rloo", "grpo", "reinforce++")
GROUP_ESTIMATORS = ("rloo", "grpo")  # compare the k samples of a prompt with each other
# Where each estimator's paper puts the KL penalty: in the per-token reward (PPO, REINFORCE++;
# RLOO's sequence reward is their sum) or as a loss term (GRPO).
KL_PLACEMENT = {"gae": "reward", "rloo": "reward", "grpo": "loss", "reinforce++": "reward"}
RAY_RESOURCE_UNIT = 0.0001  # Ray rounds resource amounts to 4 decimal places
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_FUNCTION_SPEC = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*"
)


@dataclass(frozen=True)
class ModelConfig(Section):
    """Which base model to start from. `embedded` builds a small Mistral from the fields below."""

    section: ClassVar[str] = "model"
    paths: ClassVar[tuple[str, ...]] = ("name_or_path",)
    # a Hugging Face model id or local directory, or `embedded` (built from the fields below)
    name_or_path: str = EMBEDDED_MODEL
    trust_remote_code: bool = False  # run code shipped with a hub model (only if you trust it)
    dtype: str = "float32"  # weights and compute dtype of models that are not 4-bit
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    vocab_size: int = 512  # embedded: size of the byte-level BPE tokenizer trained on the data
    hidden_size: int = 128  # embedded: width of the residual stream
    intermediate_size: int = 256  # embedded: width of the MLP
    num_layers: int = 2  # embedded: transformer blocks
    num_heads: int = 4  # embedded: attention heads
    num_kv_heads: int = 2  # embedded: key/value heads (grouped-query attention)

    def validate(self) -> None:
        self.check(bool(self.name_or_path.strip()), "name_or_path", "a model id or directory")
        self.one_of("dtype", DTYPES)
        self.positive("hidden_size", "intermediate_size", "num_layers", "num_heads")
        self.positive("num_kv_heads")
        self.check(self.vocab_size >= 300, "vocab_size", "at least 300 (bytes + merges)")
        self.check(
            self.hidden_size % self.num_heads == 0,
            "hidden_size",
            f"a multiple of num_heads={self.num_heads}",
        )
        head_dim = self.hidden_size // self.num_heads
        self.check(
            head_dim % 2 == 0,
            "hidden_size",
            f"hidden_size / num_heads even for rotary embeddings (it is {head_dim})",
        )
        self.check(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            f"a divisor of num_heads={self.num_heads}",
        )

    @property
    def is_embedded(self) -> bool:
        return self.name_or_path == EMBEDDED_MODEL


@dataclass(frozen=True)
class QuantizationConfig(Section):
    """bitsandbytes 4-bit loading (QLoRA). Off for the embedded CPU default."""

    section: ClassVar[str] = "quantization"
    load_in_4bit: bool = False  # load base weights in 4 bits (bitsandbytes); needs LoRA training
    quant_type: str = "nf4"  # 4-bit data type: nf4 (normal float) or fp4
    double_quant: bool = True  # quantise the quantisation constants too (saves ~0.4 bit/weight)
    compute_dtype: str = "bfloat16"  # dtype the 4-bit weights are dequantised to for matmuls

    def validate(self) -> None:
        self.one_of("quant_type", ("nf4", "fp4"))
        self.one_of("compute_dtype", DTYPES)


@dataclass(frozen=True)
class LoraConfig(Section):
    """The LoRA adapter used where a phase trains with `method: lora`, and always by PPO."""

    section: ClassVar[str] = "lora"
    r: int = 8  # rank of the adapter matrices
    alpha: int = 32  # scaling: the update is (alpha / r) * B @ A
    dropout: float = 0.05  # dropout on the adapter input (PPO sets every dropout to 0)
    # module names to adapt; on the command line: --lora.target_modules q_proj v_proj
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def validate(self) -> None:
        self.positive("r", "alpha")
        self.check(0 <= self.dropout < 1, "dropout", "a fraction in [0, 1)")
        self.check(len(self.target_modules) > 0, "target_modules", "at least one module name")
        for module in self.target_modules:
            if not _MODULE_NAME.fullmatch(module):
                self.fail(
                    "target_modules",
                    self.target_modules,
                    f"module names such as q_proj, not {module!r}; give a list: "
                    "[q_proj, v_proj] in YAML, --lora.target_modules q_proj v_proj on the "
                    "command line",
                )


@dataclass(frozen=True)
class DataConfig(Section):
    """Where rows come from (files, or the synthetic world for any not given) and their limits."""

    section: ClassVar[str] = "data"
    paths: ClassVar[tuple[str, ...]] = (
        "sft_path",
        "preference_path",
        "prompt_path",
        "eval_prompt_path",
        "chat_template",
    )
    sft_path: str | None = None  # demonstrations {prompt, completion}; None = synthetic
    preference_path: str | None = None  # pairs {prompt, chosen, rejected}; None = synthetic
    prompt_path: str | None = None  # PPO prompts {prompt}; None = synthetic
    eval_prompt_path: str | None = None  # held-out prompts {prompt}; None = synthetic
    num_sft: int = 2000  # synthetic demonstrations
    num_preferences: int = 2000  # synthetic preference pairs (before the held-out split)
    num_prompts: int = 1024  # synthetic PPO prompts
    num_eval_prompts: int = 64  # synthetic held-out prompts (when eval_prompt_path is None)
    flawed_fraction: float = 0.5  # share of synthetic demonstrations that are flawed on purpose
    label_noise: float = 0.1  # share of synthetic preference labels flipped
    max_prompt_tokens: int = 32  # prompt token limit (templated prompt)
    max_completion_tokens: int = 32  # completion token limit, also PPO's max new tokens
    overlong: str = "truncate"  # rows over the limits: truncate or reject (counted either way)
    prompt_template: str = "User: {prompt}\nAssistant:"  # how a text prompt is shown to the model
    # Message-list data: a Jinja chat template (a file, or the template itself) used instead of
    # the tokenizer's own and saved with every model; None = the tokenizer's own.
    chat_template: str | None = None

    def validate(self) -> None:
        self.positive("num_sft", "num_preferences", "num_prompts", "num_eval_prompts")
        self.positive("max_prompt_tokens", "max_completion_tokens")
        self.check(0 <= self.flawed_fraction < 1, "flawed_fraction", "a fraction in [0, 1)")
        self.check(0 <= self.label_noise < 0.5, "label_noise", "a rate in [0, 0.5)")
        self.one_of("overlong", ("truncate", "reject"))
        self._check_template()
        self.check(
            self.chat_template is None or bool(self.chat_template.strip()),
            "chat_template",
            "a Jinja template file or the template itself, or unset (null)",
        )
        for key in ("sft_path", "preference_path", "prompt_path", "eval_prompt_path"):
            path = getattr(self, key)
            self.check(
                path is None or bool(path.strip()),
                key,
                "a file or directory path, or unset (null) for synthetic data",
            )
        if self.eval_prompt_path is None:
            most = max_eval_prompts()
            self.check(
                self.num_eval_prompts <= most,
                "num_eval_prompts",
                f"at most {most} (half of the synthetic world's prompts), or your own "
                "prompts in data.eval_prompt_path",
            )

    def _check_template(self) -> None:
        allowed = "a template with the field {prompt} exactly once (write {{ and }} for braces)"
        try:
            parsed = list(string.Formatter().parse(self.prompt_template))
        except ValueError:
            self.fail("prompt_template", self.prompt_template, allowed)
        named = [(name, spec, conv) for _, name, spec, conv in parsed if name is not None]
        self.check(named == [("prompt", "", None)], "prompt_template", allowed)


@dataclass(frozen=True)
class SFTConfig(Section):
    """Supervised fine-tuning: loss on completion tokens only."""

    section: ClassVar[str] = "sft"
    method: str = "full"  # full fine-tuning, or a LoRA adapter (the lesson's recipe)
    epochs: int = 3  # passes over the demonstrations
    batch_size: int = 32  # rows per optimizer step, per Ray Train worker
    lr: float = 1e-3  # peak learning rate (linear warm-up, cosine decay to 10%)
    weight_decay: float = 0.0  # AdamW weight decay (decoupled, on every trained weight)
    max_grad_norm: float = 1.0  # gradients clipped to this global norm

    def validate(self) -> None:
        self.one_of("method", TRAIN_METHODS)
        self.positive("epochs", "batch_size", "lr", "max_grad_norm")
        self.non_negative("weight_decay")


@dataclass(frozen=True)
class RewardConfig(Section):
    """Reward model: a scalar head on the SFT model, Bradley-Terry loss on preference pairs."""

    section: ClassVar[str] = "reward"
    method: str = "full"  # full fine-tuning, or a LoRA adapter (the lesson's recipe)
    epochs: int = 2  # passes over the preference pairs
    batch_size: int = 32  # pairs per optimizer step, per Ray Train worker
    lr: float = 5e-4  # peak learning rate (linear warm-up, cosine decay to 10%)
    weight_decay: float = 0.01  # AdamW weight decay (decoupled, on every trained weight)
    max_grad_norm: float = 1.0  # gradients clipped to this global norm
    eval_fraction: float = 0.1  # share of preference pairs held out for pairwise accuracy

    def validate(self) -> None:
        self.one_of("method", TRAIN_METHODS)
        self.positive("epochs", "batch_size", "lr", "max_grad_norm")
        self.non_negative("weight_decay")
        self.check(0 < self.eval_fraction < 1, "eval_fraction", "a fraction in (0, 1)")


ROLES = ("train_worker", "rollout", "reward", "reference", "learner")
LEARNER_PLACEMENTS = ("pack", "spread")
TRAIN_SHARDINGS = ("ddp", "fsdp")


# Where more GPUs do help, by role (ResourcesConfig's check of *_gpus)
MORE_GPUS = {
    "train_worker": "; to use more GPUs, raise resources.train_workers",
    "rollout": "; to use more GPUs, raise ppo.num_rollout_actors",
}


@dataclass(frozen=True)
class ResourcesConfig(Section):
    """What each role asks Ray for. Fractions of a GPU let roles share one device."""

    section: ClassVar[str] = "resources"
    train_workers: int = 1  # Ray Train data-parallel workers for SFT and the reward model
    train_worker_cpus: float = 1.0  # CPUs per Ray Train worker
    train_worker_gpus: float = 0.0  # GPUs per Ray Train worker
    # Times Ray Train restarts the SFT or reward workers after one dies, from the last epoch
    # checkpoint; past that the phase fails (its checkpoints are kept for a rerun).
    train_worker_restarts: int = 2
    # how the SFT and reward workers train as one: ddp (each holds the whole model; gradients
    # averaged during the backward pass) or fsdp (FSDP2: weights, gradients and optimizer state
    # sharded over the workers, for a model one worker cannot hold). Same result up to float
    # rounding; with one worker nothing is wrapped.
    train_sharding: str = "ddp"
    rollout_cpus: float = 1.0  # CPUs per rollout generator
    rollout_gpus: float = 0.0  # GPUs per rollout generator
    reward_cpus: float = 0.5  # CPUs of the reward scorer
    reward_gpus: float = 0.0  # GPUs of the reward scorer
    reference_cpus: float = 0.5  # CPUs of the reference model
    reference_gpus: float = 0.0  # GPUs of the reference model
    learner_cpus: float = 1.0  # CPUs of the PPO learner (policy + critic)
    learner_gpus: float = 0.0  # GPUs of the PPO learner
    # torch threads of the learner; 0: as many as learner_cpus. More than learner_cpus borrows
    # cores the generators reserved, which without ppo.overlap sit idle during the update
    # (measured: 2 threads update 1.5x faster; 2 threads per generator gained nothing).
    learner_threads: int = 0
    # PPO learner ranks: each trains on its slice of every minibatch, gradients averaged by
    # torch.distributed DDP (gloo on CPU, NCCL on GPU); learner_cpus, learner_gpus and
    # learner_threads are per rank
    learner_workers: int = 1
    # how Ray's placement group lays out the learner ranks: pack (as few nodes as can hold
    # them) or spread (one per node where it can)
    learner_placement: str = "pack"
    # how the learner ranks hold a full-parameter critic (reward.method full, ppo.estimator
    # gae): ddp (each rank holds it whole) or fsdp (FSDP2: its weights, gradients and AdamW
    # moments sharded over the ranks). The LoRA policy is always under DDP: its frozen base is
    # the same on every rank, its adapter small.
    learner_sharding: str = "ddp"

    def validate(self) -> None:
        self.positive("train_workers", "learner_workers")
        self.one_of("train_sharding", TRAIN_SHARDINGS)
        self.one_of("learner_placement", LEARNER_PLACEMENTS)
        self.one_of("learner_sharding", TRAIN_SHARDINGS)
        self.non_negative("train_worker_restarts", "learner_threads")
        for role in ROLES:
            for kind in ("cpus", "gpus"):
                key = f"{role}_{kind}"
                amount = getattr(self, key)
                self.check(
                    amount == 0 or amount >= RAY_RESOURCE_UNIT,
                    key,
                    f"0 or at least {RAY_RESOURCE_UNIT} (Ray's smallest unit)",
                )
                self.non_negative(key)
            # Each role (and each Ray Train worker) runs on one device: a second GPU would be
            # reserved and left idle. Data parallelism over GPUs comes from more train workers
            # (SFT, reward) or more rollout generators; vLLM tensor parallelism and a learner
            # over several GPUs are not built yet.
            self.check(
                getattr(self, f"{role}_gpus") <= 1,
                f"{role}_gpus",
                "at most 1 (a fraction shares one GPU): the role runs on one device, and more "
                f"would be reserved and sit idle{MORE_GPUS.get(role, '')}",
            )

    @property
    def learner_torch_threads(self) -> int:
        """The PPO learner's torch threads: learner_threads, or as many as its whole CPUs."""
        return self.learner_threads or max(1, int(self.learner_cpus))


@dataclass(frozen=True)
class PPOConfig(Section):
    """PPO as an actor system. Defaults follow "The N Implementation Details of RLHF with PPO"."""

    section: ClassVar[str] = "ppo"
    steps: int = 40  # PPO iterations: generate, score, reference, learn, sync
    # advantages: gae (with a critic, PPO proper), or critic-free rloo, grpo or reinforce++
    estimator: str = "gae"
    # rollout generators at the start; rollouts_per_step is split over them as evenly as can
    # be, and `rlhf-ray scale --rollout N` changes their number while the job runs
    num_rollout_actors: int = 1
    # fixed: that many generators (or what `rlhf-ray scale` asks); auto: before each step as
    # many as the live nodes hold beside the other roles, within the two bounds below, so
    # generators start on nodes that join and the run goes on without those of nodes that leave
    rollout_scaling: str = "fixed"
    min_rollout_actors: int = 1  # auto: fewer fit, and the run stops with an error
    max_rollout_actors: int = 8  # auto: never more than this
    rollouts_per_step: int = 64  # responses sampled per iteration
    samples_per_prompt: int = 1  # k responses per prompt (a group); rloo and grpo need k >= 2
    # the KL penalty: in the reward or as a loss term; auto = as the estimator's paper does
    # (loss for grpo, reward for the others)
    kl_placement: str = "auto"
    minibatch_size: int = 16  # responses per gradient step of the learner
    epochs: int = 4  # passes of the learner over each batch
    lr: float = 5e-4  # learning rate of the policy's LoRA adapter
    # the adapter's learning rate over the steps: constant, or linear decay to lr / steps at the
    # last step, after lr_warmup_steps of linear warm-up (rlhf_ray/ppo/lr_schedule.py)
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0  # updates of linear warm-up of the adapter's learning rate
    critic_lr: float = 1e-3  # learning rate of the critic (its own optimizer)
    weight_decay: float = 0.01  # AdamW weight decay of the policy's adapter and of the critic
    kl_coef: float = 0.1  # beta: the KL penalty's weight, in the reward or the loss
    # adaptive KL (Ziegler et al. 2019): beta starts at kl_coef and after each step moves by
    # clip(kl / kl_target - 1, -0.2, 0.2) * rollouts_per_step / kl_horizon; 0: beta fixed
    kl_target: float = 0.0  # the KL (objective/kl) the adaptive beta aims at; 0: beta fixed
    kl_horizon: int = 10000  # rollouts over which beta may change by about e^(+-0.2)
    gamma: float = 1.0  # discount of GAE and of REINFORCE++ returns
    lam: float = 0.95  # lambda of GAE
    clip_range: float = 0.2  # PPO ratio clip
    value_clip_range: float = 0.2  # critic value clip around the rollout's values
    max_grad_norm: float = 1.0  # policy and critic gradients each clipped to this norm
    # early stop [SB3]: a minibatch whose approx-KL to the rollout's policy (measured before its
    # step) passes this ends the step's update, without its own step; 0: every epoch runs
    target_kl: float = 0.0
    temperature: float = 1.0  # sampling temperature; every logprob uses logits / temperature
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response with no EOS
    whiten_rewards: bool = False  # rescale per-token rewards to unit variance before GAE
    # generate the next batches while the learner updates, up to max_policy_lag versions behind
    overlap: bool = False
    # how a batch sampled by an older policy version is trained on: "ppo" clips the ratio to
    # the policy that sampled it; "decoupled" (Hilton et al. 2021, AReaL) clips it around the
    # learner's weights before this update (one no-grad pass, the proximal policy) and weighs
    # each token by min(pi_proximal / pi_behaviour, rollout.tis_cap). At lag 0 both are PPO.
    objective: str = "ppo"
    # with overlap, k: no batch is trained on more than k updates after the version that
    # sampled it (the generators run up to k batches ahead of the learner)
    max_policy_lag: int = 1
    # with overlap: "wait": the generators stop k batches ahead, each batch is trained on k
    # versions old; "drop": they never wait, a step trains on the newest sampled batch and
    # drops the older ones (rlhf_ray/ppo/staleness.py)
    stale_batches: str = "wait"
    max_role_restarts: int = 3  # restarts of a dead rollout generator, reward scorer or reference
    max_learner_restarts: int = 2  # times a dead learner is rebuilt from the newest checkpoint
    checkpoint_every: int = 10  # steps between PPO checkpoints (0: only when the job is stopped)
    keep_checkpoints: int = 2  # newest complete PPO checkpoints kept; older ones are deleted

    def validate(self) -> None:
        self.one_of("estimator", ESTIMATORS)
        self.one_of("kl_placement", ("auto", "reward", "loss"))
        self.one_of("objective", ("ppo", "decoupled"))
        self.one_of("stale_batches", staleness.MODES)
        self.positive("steps", "num_rollout_actors", "rollouts_per_step", "minibatch_size")
        self.positive("samples_per_prompt", "min_rollout_actors", "max_rollout_actors")
        self.one_of("rollout_scaling", ("fixed", "auto"))
        self.check(
            self.min_rollout_actors <= self.max_rollout_actors,
            "max_rollout_actors",
            f">= min_rollout_actors={self.min_rollout_actors}",
        )
        self.check(
            self.min_rollout_actors <= self.num_rollout_actors <= self.max_rollout_actors
            or self.rollout_scaling == "fixed",
            "num_rollout_actors",
            f"within min_rollout_actors={self.min_rollout_actors} and max_rollout_actors="
            f"{self.max_rollout_actors} when rollout_scaling is auto",
        )
        self.check(
            self.estimator not in GROUP_ESTIMATORS or self.samples_per_prompt >= 2,
            "samples_per_prompt",
            f"at least 2 with estimator {self.estimator} (it compares the samples of a prompt)",
        )
        self.check(
            self.rollouts_per_step % self.samples_per_prompt == 0,
            "rollouts_per_step",
            f"a multiple of samples_per_prompt={self.samples_per_prompt}",
        )
        self.positive("epochs", "lr", "critic_lr", "clip_range", "value_clip_range")
        self.positive("max_grad_norm", "temperature")
        self.non_negative("target_kl", "kl_target", "lr_warmup_steps")
        self.one_of("lr_schedule", ("constant", "linear"))
        self.check(self.lr_warmup_steps < self.steps, "lr_warmup_steps", f"< steps={self.steps}")
        self.positive("kl_horizon")
        self.non_negative("kl_coef", "missing_eos_penalty", "max_policy_lag", "weight_decay")
        self.non_negative("max_role_restarts", "max_learner_restarts", "checkpoint_every")
        self.positive("keep_checkpoints")
        self.check(0 < self.gamma <= 1, "gamma", "a discount in (0, 1]")
        self.check(0 <= self.lam <= 1, "lam", "a value in [0, 1]")
        self.check(
            self.rollouts_per_step % self.minibatch_size == 0,
            "minibatch_size",
            f"a divisor of rollouts_per_step={self.rollouts_per_step}",
        )
        self.check(
            not self.overlap or self.max_policy_lag >= 1,
            "max_policy_lag",
            ">= 1 when overlap is on (the next batch is sampled one version behind)",
        )

    @property
    def uses_critic(self) -> bool:
        return self.estimator == "gae"

    @property
    def autoscales(self) -> bool:
        return self.rollout_scaling == "auto"

    def unused_settings(self) -> list[str]:
        """`ppo.key=value` for each setting changed from its default that this estimator (the
        critic's, GAE's), fixed scaling (the auto bounds) or no overlap (the objective and bound
        for lagging batches) does not use, so the run can say so instead of dropping it silently."""
        critics = ("critic_lr", "value_clip_range", "lam", "whiten_rewards")
        unused = () if self.uses_critic else critics
        unused += ("gamma",) if self.estimator in GROUP_ESTIMATORS else ()
        unused += ("min_rollout_actors", "max_rollout_actors") if not self.autoscales else ()
        # without overlap no batch lags
        unused += ("objective", "max_policy_lag", "stale_batches") if not self.overlap else ()
        defaults = {f.name: f.default for f in fields(self)}
        return [f"ppo.{k}={getattr(self, k)}" for k in unused if getattr(self, k) != defaults[k]]

    @property
    def kl_in_loss(self) -> bool:
        placement = (
            KL_PLACEMENT[self.estimator] if self.kl_placement == "auto" else self.kl_placement
        )
        return placement == "loss"

    @property
    def reward_kl_coef(self) -> float:
        """beta of the KL penalty in the per-token rewards: kl_coef, or 0 when the KL is a loss
        term instead."""
        return 0.0 if self.kl_in_loss else self.kl_coef

    @property
    def loss_per_sequence(self) -> bool:
        """GRPO averages each response's token losses first, then over responses."""
        return self.estimator == "grpo"

    @property
    def prompts_per_step(self) -> int:
        return self.rollouts_per_step // self.samples_per_prompt


@dataclass(frozen=True)
class ScoringConfig(Section):
    """What the reward scorer adds up for each PPO response: the trained reward model and reward
    functions given as code, each with a weight (TRL's `reward_funcs` and `reward_weights`)."""

    section: ClassVar[str] = "scoring"
    # weight of the trained reward model's score; 0 = no reward model (its phase is skipped)
    reward_model_weight: float = 1.0
    # reward functions as module:function, called f(prompts=[...], completions=[...]) -> one
    # float per completion (TRL's reward_funcs); rlhf_ray.world.gold_judge:gold_reward is the
    # synthetic world's gold judge, for an oracle run
    functions: tuple[str, ...] = ()
    function_weights: tuple[float, ...] = ()  # one weight per function; empty = 1.0 each

    def validate(self) -> None:
        self.non_negative("reward_model_weight")
        for spec in self.functions:
            if not _FUNCTION_SPEC.fullmatch(spec):
                self.fail("functions", self.functions, f"module:function entries, not {spec!r}")
        self.check(
            len(set(self.functions)) == len(self.functions), "functions", "no function twice"
        )
        self.check(
            not self.function_weights or len(self.function_weights) == len(self.functions),
            "function_weights",
            f"one weight per function ({len(self.functions)}), or none for 1.0 each",
        )
        self.check(
            all(math.isfinite(w) for w in self.function_weights),
            "function_weights",
            "finite numbers",
        )
        self.check(
            self.reward_model_weight > 0 or bool(self.functions),
            "reward_model_weight",
            "> 0, or reward functions in scoring.functions: PPO needs a reward",
        )

    @property
    def uses_reward_model(self) -> bool:
        return self.reward_model_weight > 0

    @property
    def weights(self) -> tuple[float, ...]:
        """One weight per function in `functions`."""
        return self.function_weights or (1.0,) * len(self.functions)


@dataclass(frozen=True)
class EvalConfig(Section):
    """Held-out evaluation: during PPO (the best step becomes `policy/`), and at the end of the
    run (every model sampled, scored by the gold judge and the judges named)."""

    section: ClassVar[str] = "eval"
    samples_per_prompt: int = 2  # responses sampled per held-out prompt and model
    temperature: float = 1.0  # sampling temperature of the evaluation
    batch_size: int = 64  # prompts sampled at once
    # During PPO: every `every` steps and at the last, the held-out prompts are sampled with the
    # policy (`samples_during_training` each, at ppo.temperature) and scored by the gold judge
    # (synthetic data) or the reward model; the best step is exported as policy/, the last as
    # policy-last/. 0: no evaluation during PPO, policy/ is the last step.
    every: int = 8
    samples_during_training: int = 1  # responses per held-out prompt at each eval.every
    # At the end, besides the gold judge (which knows only the synthetic world's prompts), the
    # held-out samples of base, SFT and policy are scored by these: reward_model (the run's, when
    # it has one) and reward functions as module:function (scoring.functions' signature)
    judges: tuple[str, ...] = ("reward_model",)

    def validate(self) -> None:
        self.positive("samples_per_prompt", "temperature", "batch_size", "samples_during_training")
        self.non_negative("every")
        for judge in self.judges:
            if judge != "reward_model" and not _FUNCTION_SPEC.fullmatch(judge):
                self.fail("judges", self.judges, f"reward_model or module:function, not {judge!r}")
        self.check(len(set(self.judges)) == len(self.judges), "judges", "no judge twice")


TRACKERS = ("tensorboard", "wandb", "mlflow")
MAX_SEED = 2**31 - 1  # numpy's (and so vLLM's) seeds are below 2**32, with room for the ranks


@dataclass(frozen=True)
class RunConfig(Section):
    """Where outputs go, which phases run, the base seed, and how the local Ray starts."""

    section: ClassVar[str] = "run"
    paths: ClassVar[tuple[str, ...]] = ("output_dir",)
    output_dir: str = "runs/default"  # every phase's output; shared storage on a cluster
    phases: tuple[str, ...] = PHASES  # phases to run, in order; complete ones are skipped
    seed: int = 0  # base seed; each role and worker derives its own from it
    num_cpus: int | None = None  # CPUs of a local Ray started by the run; None = all cores
    ray_timeout_s: float = 600.0  # the longest any single remote call may take
    progress_bar: bool = True  # PPO progress: a bar on a terminal, a line per 10% otherwise
    verbose: bool = False  # also the libraries' own console output (loading bars, warnings)
    evaluate: bool = True  # after the phases, sample every model and report the gold judge
    # experiment trackers for step metrics (DIR/metrics/<phase>.jsonl is written anyway):
    # tensorboard (DIR/tb), wandb, mlflow; on the command line: --run.report_to tensorboard wandb
    report_to: tuple[str, ...] = ("tensorboard",)
    # Delete this phase's outputs and those of every phase after it, then train them again
    # (after a settings change; docs/faults.md, "Changed settings"). Give it once, not on reruns.
    redo: str | None = None

    def validate(self) -> None:
        self.check(bool(self.output_dir.strip()), "output_dir", "a directory path")
        unknown = [p for p in self.phases if p not in PHASES]
        self.check(not unknown and len(self.phases) > 0, "phases", f"a subset of {PHASES}")
        self.check(len(set(self.phases)) == len(self.phases), "phases", "no phase twice")
        self.check(
            self.redo is None or self.redo in self.phases,
            "redo",
            f"one of the phases this run runs ({', '.join(self.phases)})",
        )
        self.check(
            0 <= self.seed <= MAX_SEED,
            "seed",
            f"a whole number from 0 to {MAX_SEED} (torch, numpy and vLLM take seeds of at most "
            "32 or 64 bits, and each worker adds its rank)",
        )
        self.check(self.num_cpus is None or self.num_cpus > 0, "num_cpus", "> 0 or None")
        self.positive("ray_timeout_s")
        unknown = [t for t in self.report_to if t not in TRACKERS]
        self.check(not unknown, "report_to", f"trackers among {', '.join(TRACKERS)} (or none)")
        self.check(len(set(self.report_to)) == len(self.report_to), "report_to", "each once")


@dataclass(frozen=True)
class Config:
    """Every setting of a run, one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def rollout_engine(self) -> str:
        """ "hf", "vllm", or "auto": each generator with a GPU picks where it runs (vLLM where it
        is installed there and this config fits it, else hf; `vllm_misfit`)."""
        return self.rollout.resolved_engine(self.resources.rollout_gpus)

    @property
    def logprob_source(self) -> str:
        """ "sampler" or "learner": where the PPO ratio's old logprobs come from."""
        low_precision = self.quantization.load_in_4bit or self.model.dtype != "float32"
        return resolved_logprob_source(self.rollout, self.rollout_engine, low_precision)

    def __post_init__(self) -> None:
        if self.rollout_engine == "vllm" and self.vllm_misfit():
            raise ConfigError(self.vllm_misfit())
        self._check_logprob_source()
        self._check_partial_rollouts()
        ranks = self.resources.learner_workers
        if self.ppo.minibatch_size % ranks:
            raise ConfigError(
                f"ppo.minibatch_size={self.ppo.minibatch_size}: expected a multiple of "
                f"resources.learner_workers={ranks} (each learner rank trains on an equal slice "
                "of every minibatch)"
            )
        self._check_learner_sharding()
        if self.quantization.load_in_4bit:
            for phase in (self.sft, self.reward):
                if phase.method != "lora":
                    raise ConfigError(
                        f"{phase.section}.method={phase.method!r}: 4-bit weights cannot be "
                        "fully fine-tuned; expected 'lora' when quantization.load_in_4bit is true"
                    )
            if self.resources.train_sharding == "fsdp":
                # FSDP2 would cut bitsandbytes' packed 4-bit tensors apart from their
                # quantisation state
                raise ConfigError(
                    "resources.train_sharding='fsdp' with quantization.load_in_4bit: FSDP2 "
                    "cannot shard 4-bit weights; expected 'ddp'"
                )
            if self.model.is_embedded and self.model.hidden_size % 64:
                raise ConfigError(
                    f"model.hidden_size={self.model.hidden_size}: expected a multiple of 64 "
                    "when quantization.load_in_4bit is true (bitsandbytes 4-bit blocks)"
                )

    def _check_learner_sharding(self) -> None:
        """learner_sharding fsdp shards the critic when it is trained in full; a run without
        such a critic would have nothing to shard, and the setting would do nothing."""
        if self.resources.learner_sharding != "fsdp":
            return
        if not self.ppo.uses_critic:
            raise ConfigError(
                f"resources.learner_sharding='fsdp' shards the critic, and ppo.estimator="
                f"{self.ppo.estimator!r} trains none; expected 'ddp' (the LoRA policy is always "
                "under DDP)"
            )
        if self.reward.method != "full":
            raise ConfigError(
                f"resources.learner_sharding='fsdp' shards a critic trained in full, and "
                f"reward.method={self.reward.method!r} makes it a LoRA adapter (under DDP); "
                "expected 'ddp'"
            )

    def vllm_misfit(self) -> str | None:
        """What the vLLM engine cannot do with the other sections (None: nothing): refused
        before any work with rollout.engine vllm; with auto, generators use hf instead."""
        rollout, model = self.rollout, self.model
        where = f"rollout.engine={rollout.engine!r} (vllm)"
        gpus = self.resources.rollout_gpus
        if self.quantization.load_in_4bit and gpus == 0:
            return (
                f"{where} with quantization.load_in_4bit: vLLM loads bitsandbytes 4-bit weights on "
                "GPUs only; set resources.rollout_gpus, or rollout.engine: hf"
            )
        head_dim = model.hidden_size // model.num_heads
        if model.is_embedded and gpus == 0 and head_dim not in VLLM_CPU_HEAD_SIZES:
            return (
                f"{where}: model.hidden_size / model.num_heads = {head_dim}, a head size vLLM's "
                f"CPU attention does not support (it does {list(VLLM_CPU_HEAD_SIZES)})"
            )
        if 0 < gpus < 1 and rollout.gpu_memory_utilization >= gpus:
            return (
                f"rollout.gpu_memory_utilization={rollout.gpu_memory_utilization}: expected less "
                f"than resources.rollout_gpus={gpus}, the share of a GPU each engine is given "
                "(its CUDA context lies outside vLLM's budget)"
            )
        rollout_len = self.data.max_prompt_tokens + self.data.max_completion_tokens
        if 0 < rollout.max_model_len < rollout_len:
            return (
                f"rollout.max_model_len={rollout.max_model_len}: expected 0 or at least "
                f"{rollout_len}, data.max_prompt_tokens + data.max_completion_tokens"
            )
        if self.lora.r > VLLM_MAX_LORA_RANK:
            return f"lora.r={self.lora.r}: expected at most {VLLM_MAX_LORA_RANK} (vLLM)"
        if rollout.logprob_source == "sampler":
            return (
                f"rollout.logprob_source='sampler' with {where}: vLLM's logprobs come from "
                "another implementation of the model; expected auto or learner (the learner "
                "recomputes them)"
            )
        return None

    def _check_partial_rollouts(self) -> None:
        chunk = self.rollout.partial_chunk_tokens
        if chunk and not self.ppo.overlap:
            raise ConfigError(
                f"rollout.partial_chunk_tokens={chunk} without ppo.overlap: no update is made "
                "while a batch is sampled, so none can reach it; set ppo.overlap true, or 0"
            )

    def _check_logprob_source(self) -> None:
        rollout, source = self.rollout, self.logprob_source
        # with auto on GPUs a generator may pick vLLM, whose logprobs the learner recomputes
        may_be_vllm = self.rollout_engine == "auto" and self.vllm_misfit() is None
        where = f"rollout.logprob_source {source}, {self.model.dtype} on {self.rollout_engine}"
        if rollout.logprob_correction == "tis" and source != "learner" and not may_be_vllm:
            raise ConfigError(
                "rollout.logprob_correction='tis' weighs each token by pi_learner / pi_sampler; "
                f"with the old logprobs from the sampler ({where}) every weight is 1: set "
                "rollout.logprob_source learner, or logprob_correction none"
            )
        learner_computes = source == "learner" or may_be_vllm
        corrected = rollout.logprob_correction == "tis" or self.ppo.objective == "decoupled"
        if self.ppo.overlap and learner_computes and not corrected:
            raise ConfigError(
                f"ppo.overlap with old logprobs from the learner ({where}): expected "
                "rollout.logprob_correction tis or ppo.objective decoupled. The learner's own "
                "logprobs are of the version after the batch was sampled; only the importance "
                "weights correct for that lag (the sampler's logprobs do, in float32 with "
                "rollout.engine hf)"
            )
