"""One frozen, validated dataclass per concern, and the `Config` that groups them.

Each component receives only the section it needs (e.g. the SFT loop gets `SFTConfig`), never
the whole `Config`. Validation raises `ConfigError` naming `section.key`, the value and what is
allowed. The comment on each field is its one-line description in `rlhf-ray run --help`.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field
from typing import ClassVar

from rlhf_ray.config.ppo import PPOConfig
from rlhf_ray.config.resources import ResourcesConfig
from rlhf_ray.config.rollout import (
    VLLM_CPU_HEAD_SIZES,
    VLLM_MAX_LORA_RANK,
    RolloutConfig,
    resolved_logprob_source,
)
from rlhf_ray.config.section import Section
from rlhf_ray.errors import ConfigError
from rlhf_ray.world.assistant_world import max_eval_prompts

EMBEDDED_MODEL = "embedded"
PHASES = ("sft", "reward", "ppo")
DTYPES = ("float32", "bfloat16", "float16")
TRAIN_METHODS = ("full", "lora")
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
        listed = " (on the command line: --run.phases sft reward, or --phases sft,reward)"
        self.check(
            not unknown and len(self.phases) > 0,
            "phases",
            f"a subset of {PHASES}" + (listed if any("," in p for p in unknown) else ""),
        )
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
