"""A console a person can read: rlhf-ray's own lines, each once; library noise (weight loading
and saving bars, load reports, deprecation and kernel warnings, the UserWarnings known to be
noise, Ray Train's per-checkpoint lines) only with `run.verbose`.

Every process of a run (the driver, Ray Train workers, the PPO actors, evaluation tasks) calls
`quiet_libraries()` first. The driver records the choice in RLHF_RAY_VERBOSE before it starts a
local Ray, whose workers inherit it; on a cluster, quiet is the default (set RLHF_RAY_VERBOSE=1
in the job's runtime_env env_vars to see everything).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

VERBOSE_ENV = "RLHF_RAY_VERBOSE"
# Libraries whose deprecation warnings are about their own internals, not a run's settings.
_NOISY_MODULES = r"(transformers|peft|bitsandbytes|torch|accelerate|datasets|huggingface_hub|vllm)"
# Their UserWarnings that are known noise, by the start of the message (a regex), each seen in
# this project's runs; any other UserWarning of theirs is shown, since it may concern the run.
KNOWN_NOISE = (
    # torch, under gradient checkpointing (seen in 4-bit training): the Hugging Face libraries
    # call checkpoint without use_reentrant; advice to their developers, no setting of a run
    r"torch\.utils\.checkpoint: the use_reentrant parameter should be passed explicitly",
)


def set_verbose(verbose: bool) -> None:
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_libraries() -> None:
    if is_verbose():
        return
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # vLLM (read when it is imported): its start-up INFO lines and the warnings of its CPU build
    # about settings it does not use here (the chat-template warm-up of a tokenizer it never
    # loads: rollouts arrive as token ids)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # datasets reads these when it is imported: only processes that read user rows import it
    # (~1 s of CPU), so it is not imported here to quiet it
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()  # load reports, "MISSING" head weights
    transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing shards"
    if "datasets" in sys.modules:  # imported before this ran: its environment came too late
        sys.modules["datasets"].disable_progress_bars()
        sys.modules["datasets"].utils.logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # the CPU kernel warning
    logging.getLogger(_ray_train_context_logger()).setLevel(logging.WARNING)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_NOISY_MODULES)
    for message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message, UserWarning, _NOISY_MODULES)


def skip_bitsandbytes(needed: bool) -> None:
    """Unless `needed` (something quantised, or code not ours that may import it), bitsandbytes
    looks not installed to this process from here on.

    peft imports bitsandbytes whatever the settings, and that import probes the Hugging Face hub
    (through `kernels`) for a CPU 4-bit kernel on CPUs with AVX512-BF16: a warning "Failed to
    load CPU gemm_4bit_forward from kernels-community", and CPU time, in every process that
    imports peft. A module that sys.modules maps to None cannot be imported (Python's way of
    blocking one), and peft and transformers, which ask importlib.util.find_spec, then see none.
    Call it first in a process Ray gives one role (an actor, a Ray Train worker) that runs no
    user code: the block lasts as long as the process.
    """
    if not needed:
        sys.modules.setdefault("bitsandbytes", None)


def _ray_train_context_logger() -> str:
    """ "Reporting training result ..." on every epoch: Ray Train (2.5x-2.6x) logs it from a
    logger named by its file's path, outside "ray.train", so LoggingConfig does not reach it.
    The path is worked out, not imported: ray.train takes ~0.5 s to import, in every process
    that calls quiet_libraries (a Ray version without that file has no such logger to quiet)."""
    import ray

    return str(Path(ray.__file__).parent / "train/v2/_internal/execution/context.py")


def ray_train_log_level() -> str:
    """Ray Train's own lines ("Reporting training result", "Checkpoint successfully created")."""
    return "INFO" if is_verbose() else "WARNING"


class Lines:
    """A phase's progress as plain lines, about every 10% of its steps: `[name] step i/n
    values (elapsed, ~left)`. Lines stay readable in logs and under Ray, where a redrawn bar
    turns into a run of carriage returns."""

    def __init__(self, name: str, total: int, done: int = 0, enabled: bool = True) -> None:
        self.name, self.total, self.done_at_start = name, total, done
        self.every = max(1, total // 10)
        self.start, self.enabled = time.time(), enabled

    def line(self, step: int, **shown: str) -> str | None:
        if not self.enabled or (step % self.every and step != self.total):
            return None
        elapsed = time.time() - self.start
        rate = elapsed / max(1, step - self.done_at_start)
        left = rate * (self.total - step)
        values = " ".join(f"{k} {v}" for k, v in shown.items())
        return (
            f"[{self.name}] step {step}/{self.total} {values} ({elapsed:.0f}s, ~{left:.0f}s left)"
        )


class StepDisplay:
    """The driver's progress display for a phase: a tqdm bar on a terminal, `Lines` otherwise
    (a log file, `ray job logs`)."""

    def __init__(self, name: str, total: int, done: int, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(initial=done, total=total, desc=name)
        self.lines = Lines(name, total, done, enabled=enabled and self.bar is None)

    def update(self, step: int, **shown: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix(shown)
            self.bar.update(1)
        elif line := self.lines.line(step, **shown):
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
