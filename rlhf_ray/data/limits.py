"""How prompts are shown to the model and how long prompts and completions may be.

Its own module, with nothing heavy imported: the settings sent to Ray Train carry it, and Ray
Train unpickles them in its controller, which never tokenizes anything.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    template: str  # contains "{prompt}" once: how a text prompt is shown to the model
    max_prompt_tokens: int
    max_completion_tokens: int
    chat_template: str | None = None  # Jinja for message lists; None = the tokenizer's own
