"""PPO checkpoints on disk: `<output_dir>/ppo_checkpoints/step-N/`, written so a crash at any
moment leaves the newest complete one usable.

A checkpoint is two files and a marker, nothing pickled:
  tensors.safetensors  every tensor (weights, optimizer moments, RNG states, the batch in flight)
  state.json           everything else (steps, versions, the prompt order, optimizer settings)
  COMPLETE             written last; a directory without it is ignored and removed
Writing goes to `.step-N.tmp-<pid>/`, every file is fsynced, the directory is renamed to
`step-N/` and fsynced, and only then is COMPLETE written (and fsynced). Older checkpoints are
deleted after that, keeping the `keep` newest complete ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rlhf_ray.errors import UserInputError

CHECKPOINTS_DIR = "ppo_checkpoints"
TENSORS_FILE, STATE_FILE, COMPLETE_FILE = "tensors.safetensors", "state.json", "COMPLETE"
_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoints_root(output_dir: Path) -> Path:
    return output_dir / CHECKPOINTS_DIR


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_steps(root: Path) -> list[int]:
    """Steps with a complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and (entry / COMPLETE_FILE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def newest_complete(root: Path) -> Path | None:
    steps = complete_steps(root)
    return root / f"step-{steps[-1]}" if steps else None


def remove_incomplete(root: Path) -> list[str]:
    """Delete what dead runs left: temporary directories and `step-N/` without COMPLETE.
    Returns the names removed."""
    if not root.is_dir():
        return []
    removed = []
    for entry in root.iterdir():
        is_step = _STEP_DIR.fullmatch(entry.name)
        if entry.name.startswith(".step-") or (is_step and not (entry / COMPLETE_FILE).exists()):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return sorted(removed)


def write_checkpoint(
    root: Path, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int
) -> Path:
    """Write checkpoint `step` atomically, then keep only the `keep` newest complete ones."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    if final.exists():  # an incomplete leftover of this very step (a complete one is final)
        shutil.rmtree(final)
    tmp = root / f".step-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / TENSORS_FILE
        )
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        for name in (TENSORS_FILE, STATE_FILE):
            _fsync(tmp / name)
        _fsync(tmp)
        os.replace(tmp, final)
        _fsync(root)
        (final / COMPLETE_FILE).write_text(f"{step}\n")
        _fsync(final / COMPLETE_FILE)
        _fsync(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in complete_steps(root)[:-keep]:
        shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a complete checkpoint directory."""
    if not (path / COMPLETE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a complete PPO checkpoint (no {COMPLETE_FILE})")
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        return load_file(path / TENSORS_FILE), state
    except (OSError, ValueError, SafetensorError) as err:  # damaged on disk after it completed
        raise UserInputError(
            f"{path}: this PPO checkpoint cannot be read ({err}); delete the directory to "
            "resume from the one before it, or use a new run.output_dir"
        ) from err
