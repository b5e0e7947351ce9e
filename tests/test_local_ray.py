"""Tier 2: local Rays started by runs launched together on one machine. Three `rlhf-ray run`s
launched at once failed two of them: each found the dashboard's port free, then could not bind
it once the first Ray had ("Failed to find a valid port for dashboard")."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow  # three local Rays

REPO = Path(__file__).resolve().parent.parent
# Each process imports everything, says it is ready, and waits for the others: then all three
# choose their dashboard's port in the same moment, the preferred one free (the test's), and
# keep their Ray until the test has read what each said.
START = """
import sys, time
from pathlib import Path
from jobs import cluster
from rlhf_ray.config.sections import RunConfig
cluster.DASHBOARD_PORT = int(sys.argv[2])
sync = Path(sys.argv[1])
(sync / f"ready-{sys.argv[3]}").touch()
while not (sync / "go").exists():
    time.sleep(0.005)
print(cluster.start_local(RunConfig(num_cpus=1)), flush=True)
while not (sync / "done").exists():  # the three Rays run side by side, as the runs' would
    time.sleep(0.05)
"""


def test_local_rays_started_at_once_each_get_a_dashboard_of_their_own(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    preferred = str(free_port())
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", START, str(tmp_path), preferred, str(i)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(3)
    ]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready-*"))) < 3:
        assert time.time() < deadline and all(s.poll() is None for s in starts)
        time.sleep(0.05)
    (tmp_path / "go").touch()
    said = [_until_started(start) for start in starts]
    (tmp_path / "done").touch()
    codes = [start.wait(timeout=120) for start in starts]
    assert codes == [0, 0, 0], said
    urls = {text.split("dashboard at ")[1].split()[0] for text in said}
    assert len(urls) == 3 and f"http://127.0.0.1:{preferred}" in urls, said


def _until_started(start: subprocess.Popen) -> str:
    """Its output up to the line naming its dashboard (or all of it, if it ended first)."""
    lines = []
    for line in start.stdout:
        lines.append(line)
        if "dashboard at " in line:
            break
    return "".join(lines)
