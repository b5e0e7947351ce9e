"""Prompts that hold a rollout generator inside its `generate` call until the test lets go.

A Ray worker unpickles a task's arguments as it runs the task. A held prompt unpickles to its
plain text, but while the gate is closed it first marks `entered-<pid>` in the gate's folder
and waits there: once a generator's mark is there, that generator is inside `generate`, and
stays there until the gate opens, however the processes are scheduled.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

POLL_S = 0.01


def wait_at_gate(text: str, folder: str) -> str:
    """What a held prompt unpickles to: `text`, after the gate in `folder` opens."""
    closed = Path(folder) / "closed"
    if closed.exists():
        (Path(folder) / f"entered-{os.getpid()}").touch()
        while closed.exists():
            time.sleep(POLL_S)
    return text


class HeldPrompt(str):
    """A text prompt whose unpickling waits at the gate in `folder`."""

    folder: str

    def __new__(cls, text: str, folder: str) -> HeldPrompt:
        prompt = super().__new__(cls, text)
        prompt.folder = folder
        return prompt

    def __reduce__(self):
        return wait_at_gate, (str(self), self.folder)


class Gate:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def hold(self, prompt: str) -> HeldPrompt:
        assert isinstance(prompt, str), "only text prompts can be held"
        return HeldPrompt(prompt, str(self.folder))

    def wait_entered(self, pid: int, timeout_s: float) -> None:
        """Return once process `pid` waits at the gate; fail after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not (self.folder / f"entered-{pid}").exists():
            assert time.monotonic() < deadline, f"process {pid} never reached the gate"
            time.sleep(POLL_S)


@contextmanager
def closed_gate(folder: Path) -> Iterator[Gate]:
    """A gate in `folder`, closed until the block ends (opened whatever happens in it)."""
    folder.mkdir(parents=True, exist_ok=True)
    closed = folder / "closed"
    closed.touch()
    try:
        yield Gate(folder)
    finally:
        closed.unlink()
