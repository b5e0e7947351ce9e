"""One frozen, validated dataclass per concern, and the `Config` that groups them.

Each component receives only the section it needs (e.g. the SFT loop gets `SFTConfig`), never
the whole `Config`. Validation raises `ConfigError` naming the field, the value and what is
allowed; `config_loader` adds the section name so the message reads `sft.epochs=0: ...`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from rlhf_ray.errors import ConfigError

EMBEDDED_MODEL = "embedded"
PHASES = ("sft", "reward", "ppo")
DTYPES = ("float32", "bfloat16", "float16")
TRAIN_METHODS = ("full", "lora")


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: expected {allowed}")


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(value > 0, name, value, "a number > 0")


def _fraction(obj: object, *names: str, low_open: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        ok = (0 < value < 1) if low_open else (0 <= value < 1)
        _check(ok, name, value, "a fraction in (0, 1)" if low_open else "a fraction in [0, 1)")


def _non_negative(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(value >= 0, name, value, "a number >= 0")


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to start from. `embedded` builds a small Mistral from the fields below."""

    name_or_path: str = EMBEDDED_MODEL
    trust_remote_code: bool = False
    dtype: str = "float32"  # weights and compute dtype of non-quantised models
    gradient_checkpointing: bool = False
    # Only for the embedded model: a Mistral-architecture causal LM made from config.
    vocab_size: int = 512  # size of the byte-level BPE tokenizer trained on the run's data
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2

    def __post_init__(self) -> None:
        _check(bool(self.name_or_path.strip()), "name_or_path", self.name_or_path, "a model id")
        _check(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")
        _positive(self, "hidden_size", "intermediate_size", "num_layers", "num_heads")
        _positive(self, "num_kv_heads")
        _check(
            self.vocab_size >= 300, "vocab_size", self.vocab_size, "at least 300 (bytes + merges)"
        )
        _check(
            self.hidden_size % self.num_heads == 0,
            "hidden_size",
            self.hidden_size,
            f"a multiple of num_heads={self.num_heads}",
        )
        _check(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            self.num_kv_heads,
            f"a divisor of num_heads={self.num_heads}",
        )

    @property
    def is_embedded(self) -> bool:
        return self.name_or_path == EMBEDDED_MODEL


@dataclass(frozen=True)
class QuantizationConfig:
    """bitsandbytes 4-bit loading (QLoRA). Off for the embedded CPU default."""

    load_in_4bit: bool = False
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        _check(self.quant_type in ("nf4", "fp4"), "quant_type", self.quant_type, "nf4 or fp4")
        _check(
            self.compute_dtype in DTYPES, "compute_dtype", self.compute_dtype, f"one of {DTYPES}"
        )


@dataclass(frozen=True)
class LoraConfig:
    """The LoRA adapter used where a phase trains with `method: lora`, and always by PPO."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        _positive(self, "r", "alpha")
        _fraction(self, "dropout")
        _check(len(self.target_modules) > 0, "target_modules", self.target_modules, "a module name")


@dataclass(frozen=True)
class DataConfig:
    """Where rows come from (files, or the synthetic world for any not given) and their limits."""

    sft_path: str | None = None
    preference_path: str | None = None
    prompt_path: str | None = None
    eval_prompt_path: str | None = None
    # Synthetic world: sizes, the share of flawed demonstrations, preference label noise.
    num_sft: int = 2000
    num_preferences: int = 2000
    num_prompts: int = 1024
    num_eval_prompts: int = 128
    flawed_fraction: float = 0.5
    label_noise: float = 0.1
    # Token limits; rows over them are truncated or rejected (and counted in the report).
    max_prompt_tokens: int = 32
    max_completion_tokens: int = 32
    overlong: str = "truncate"
    prompt_template: str = "User: {prompt}\nAssistant:"

    def __post_init__(self) -> None:
        _positive(self, "num_sft", "num_preferences", "num_prompts", "num_eval_prompts")
        _positive(self, "max_prompt_tokens", "max_completion_tokens")
        _fraction(self, "flawed_fraction")
        _check(0 <= self.label_noise < 0.5, "label_noise", self.label_noise, "a rate in [0, 0.5)")
        _check(
            self.overlong in ("truncate", "reject"), "overlong", self.overlong, "truncate or reject"
        )
        _check(
            self.prompt_template.count("{prompt}") == 1,
            "prompt_template",
            self.prompt_template,
            "a template containing '{prompt}' exactly once",
        )


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning: loss on completion tokens only."""

    method: str = "full"  # full fine-tuning, or a LoRA adapter (the lesson's recipe)
    epochs: int = 3
    batch_size: int = 32  # per Ray Train worker
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _check(self.method in TRAIN_METHODS, "method", self.method, f"one of {TRAIN_METHODS}")
        _positive(self, "epochs", "batch_size", "lr", "max_grad_norm")
        _non_negative(self, "weight_decay")


@dataclass(frozen=True)
class RewardConfig:
    """Reward model: a scalar head on the SFT model, Bradley-Terry loss on preference pairs."""

    method: str = "full"
    epochs: int = 2
    batch_size: int = 32
    lr: float = 5e-4
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.1  # share of preference pairs held out for pairwise accuracy

    def __post_init__(self) -> None:
        _check(self.method in TRAIN_METHODS, "method", self.method, f"one of {TRAIN_METHODS}")
        _positive(self, "epochs", "batch_size", "lr", "max_grad_norm")
        _fraction(self, "eval_fraction", low_open=True)


@dataclass(frozen=True)
class ResourcesConfig:
    """What each role asks Ray for. Fractions of a GPU let roles share one device."""

    train_workers: int = 1  # Ray Train data-parallel workers for SFT and the reward model
    train_worker_cpus: float = 1.0
    train_worker_gpus: float = 0.0
    rollout_cpus: float = 1.0  # per rollout generator
    rollout_gpus: float = 0.0
    reward_cpus: float = 0.5
    reward_gpus: float = 0.0
    reference_cpus: float = 0.5
    reference_gpus: float = 0.0
    learner_cpus: float = 1.0
    learner_gpus: float = 0.0

    def __post_init__(self) -> None:
        _positive(self, "train_workers")
        for f in fields(self):
            if f.name != "train_workers":
                _non_negative(self, f.name)
        for role in ("train_worker", "rollout", "reward", "reference", "learner"):
            gpus = getattr(self, f"{role}_gpus")
            _check(
                gpus <= 1 or gpus == int(gpus),
                f"{role}_gpus",
                gpus,
                "a fraction <= 1 or a whole number",
            )


@dataclass(frozen=True)
class PPOConfig:
    """PPO as an actor system. Defaults follow "The N Implementation Details of RLHF with PPO"."""

    steps: int = 40  # PPO iterations: generate, score, reference, learn, sync
    num_rollout_actors: int = 1
    rollouts_per_step: int = 64  # responses per iteration, split over the rollout generators
    minibatch_size: int = 16
    epochs: int = 4  # passes of the learner over each batch
    lr: float = 5e-4  # policy LoRA adapter
    critic_lr: float = 1e-3
    kl_coef: float = 0.1  # beta in r_t = -beta * (logp - logp_ref)
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    temperature: float = 1.0  # sampling temperature; every logprob uses logits / temperature
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response with no EOS
    whiten_rewards: bool = False
    overlap: bool = False  # generate the next batch while the learner updates (lag <= 1)
    max_policy_lag: int = 1  # batches sampled more than this many versions ago are an error
    max_generator_restarts: int = 3  # a dead rollout generator is restarted this many times

    def __post_init__(self) -> None:
        _positive(self, "steps", "num_rollout_actors", "rollouts_per_step", "minibatch_size")
        _positive(self, "epochs", "lr", "critic_lr", "clip_range", "value_clip_range")
        _positive(self, "max_grad_norm", "temperature")
        _non_negative(self, "kl_coef", "vf_coef", "missing_eos_penalty", "max_policy_lag")
        _non_negative(self, "max_generator_restarts")
        _check(0 < self.gamma <= 1, "gamma", self.gamma, "a discount in (0, 1]")
        _check(0 <= self.lam <= 1, "lam", self.lam, "a value in [0, 1]")
        _check(
            self.rollouts_per_step % self.num_rollout_actors == 0,
            "rollouts_per_step",
            self.rollouts_per_step,
            f"a multiple of num_rollout_actors={self.num_rollout_actors}",
        )
        _check(
            self.rollouts_per_step % self.minibatch_size == 0,
            "minibatch_size",
            self.minibatch_size,
            f"a divisor of rollouts_per_step={self.rollouts_per_step}",
        )
        _check(
            not self.overlap or self.max_policy_lag >= 1,
            "max_policy_lag",
            self.max_policy_lag,
            ">= 1 when overlap is on (the next batch is sampled one version behind)",
        )


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation by the gold judge: sampled responses, compared per prompt."""

    samples_per_prompt: int = 2
    temperature: float = 1.0
    batch_size: int = 64

    def __post_init__(self) -> None:
        _positive(self, "samples_per_prompt", "temperature", "batch_size")


@dataclass(frozen=True)
class RunConfig:
    """Where outputs go, which phases run, the base seed, and how the local Ray starts."""

    output_dir: str = "runs/default"
    phases: tuple[str, ...] = PHASES
    seed: int = 0
    num_cpus: int | None = None  # for a local Ray only; None = all cores
    ray_timeout_s: float = 600.0  # the longest any single remote call may take
    progress_bar: bool = True

    def __post_init__(self) -> None:
        _check(bool(self.output_dir.strip()), "output_dir", self.output_dir, "a directory path")
        unknown = [p for p in self.phases if p not in PHASES]
        _check(not unknown and len(self.phases) > 0, "phases", self.phases, f"a subset of {PHASES}")
        _check(len(set(self.phases)) == len(self.phases), "phases", self.phases, "no phase twice")
        _check(self.num_cpus is None or self.num_cpus > 0, "num_cpus", self.num_cpus, "> 0")
        _positive(self, "ray_timeout_s")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.quantization.load_in_4bit:
            for phase in ("sft", "reward"):
                method = getattr(self, phase).method
                if method != "lora":
                    raise ConfigError(
                        f"{phase}.method={method!r}: 4-bit weights cannot be fully fine-tuned; "
                        "expected 'lora' when quantization.load_in_4bit is true"
                    )
