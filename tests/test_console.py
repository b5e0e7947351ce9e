"""Tier 1: what the quiet console hides of the libraries' warnings, and what it still shows; and
bitsandbytes, kept out of processes that quantise nothing (in a fresh Python: seconds)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from rlhf_ray.run import console


def _shown(module: str, category: type[Warning], message: str) -> list[str]:
    """The messages a warning raised from `module` leaves on a quiet console."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # below the console's filters: nothing shown only once
        console.quiet_libraries()
        warnings.warn_explicit(message, category, f"{module}.py", 1, module=module, registry={})
    return [str(w.message) for w in caught]


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "0")


CHECKPOINT = (
    "torch.utils.checkpoint: the use_reentrant parameter should be passed explicitly. Starting "
    "in PyTorch 2.9, calling checkpoint without use_reentrant will raise an exception."
)


@pytest.mark.parametrize(
    ("module", "category", "message"),
    [
        ("torch._dynamo.eval_frame", UserWarning, CHECKPOINT),  # as seen under 4-bit training
        ("transformers.modeling_utils", FutureWarning, "`x` is deprecated, use `y`"),
        ("torch.jit._script", DeprecationWarning, "`torch.jit.script_method` is deprecated"),
    ],
)
def test_known_library_noise_is_hidden(quiet, module, category, message):
    assert _shown(module, category, message) == []


@pytest.mark.parametrize("module", ["transformers.generation.utils", "peft.tuners.lora.model"])
def test_an_unknown_user_warning_of_a_library_is_shown(quiet, module):
    """A warning nobody has judged yet may concern the run's settings: it reaches the user."""
    message = "Setting `pad_token_id` to `eos_token_id` for open-end generation."
    assert _shown(module, UserWarning, message) == [message]


def test_verbose_shows_the_noise_too(monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert _shown("torch._dynamo.eval_frame", UserWarning, CHECKPOINT) == [CHECKPOINT]


# A LoRA adapter made and trained one step, as a role's process does; then whether bitsandbytes
# was imported, and whether transformers thinks it is installed.
LORA_STEP = """
import sys
from rlhf_ray.run.console import skip_bitsandbytes
skip_bitsandbytes(needed={needed})
import peft, torch, transformers

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x)

model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, target_modules=["proj"]))
model(torch.ones(1, 4)).sum().backward()
print(sys.modules.get("bitsandbytes") is not None, transformers.utils.is_bitsandbytes_available())
"""


@pytest.mark.parametrize("needed", [False, True])
def test_bitsandbytes_is_imported_only_where_needed(needed):
    """peft imports bitsandbytes whatever the settings (needed=True: as without the skip), and
    its import probes the hub for a CPU kernel; skipped, LoRA works without it."""
    done = subprocess.run(
        [sys.executable, "-c", LORA_STEP.format(needed=needed)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(needed), str(needed)]
    if not needed:
        assert "gemm_4bit_forward" not in done.stderr
