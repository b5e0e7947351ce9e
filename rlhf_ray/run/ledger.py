"""The PPO rollout ledger, `<output_dir>/ppo_rollouts.jsonl`: one line per trained step saying
which RL prompts it used and which generator sampled how many rows with which policy version.

With it a user (and tests/test_scaling.py) can check that every prompt is used once per pass
over the prompt set, whatever generators came and went. A resumed run first drops the lines of
steps after its checkpoint, which it trains again, so each step appears once.
"""

from __future__ import annotations

import json
from pathlib import Path

LEDGER_FILE = "ppo_rollouts.jsonl"


class RolloutLedger:
    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / LEDGER_FILE

    def record(self, step: int, prompt_ids: list[int], shards: dict[str, dict]) -> None:
        """`prompt_ids`: rows of the prompt file, once per prompt (each sampled k times);
        `shards`: generator name -> {"rows", "policy_version", ...}."""
        line = {"step": step, "prompt_ids": prompt_ids, "generators": shards}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def keep_through(self, step: int) -> None:
        """Drop the lines of steps after `step` (0: all), as a resume from its checkpoint does."""
        if not self.path.exists():
            return
        kept = [line for line in self.read() if line["step"] <= step]
        self.path.write_text("".join(json.dumps(line) + "\n" for line in kept), encoding="utf-8")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line]
        parsed = []
        for i, line in enumerate(lines):
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:  # only the last line can be cut short by a kill
                    raise
        return parsed
