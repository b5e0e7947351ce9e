"""Atomic phase directories: written under a temporary name, then renamed into place.

So a phase directory that exists is complete, and a run that died half-way leaves only a
`.tmp-*` directory behind, which the next run removes and redoes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

METRICS_FILE = "metrics.json"
PHASE_DIRS = {"sft": "sft", "reward": "reward", "ppo": "policy"}  # phase -> its output folder


def phase_dir(output_dir: Path, phase: str) -> Path:
    """Where `phase` ("sft", "reward" or "ppo") writes its complete output."""
    return output_dir / PHASE_DIRS[phase]


def _tmp_for(final: Path) -> Path:
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` only if the block succeeds."""
    if final.exists():
        raise FileExistsError(f"{final} exists already; a complete phase is never overwritten")
    tmp = _tmp_for(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def replace_dir(final: Path) -> Iterator[Path]:
    """Like `atomic_dir`, but replaces an existing `final` (for re-derivable outputs)."""
    tmp = _tmp_for(final)
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    try:
        yield tmp
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def is_complete(phase_dir: Path) -> bool:
    """A phase is complete when its directory exists with its metrics (written last)."""
    return (phase_dir / METRICS_FILE).is_file()


def write_metrics(phase_dir: Path, metrics: dict) -> None:
    (phase_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")


def read_metrics(phase_dir: Path) -> dict:
    return json.loads((phase_dir / METRICS_FILE).read_text())
