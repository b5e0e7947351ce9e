"""One run per output directory: a second driver is refused before it changes anything there,
and a lock whose owner is gone is taken over, with the console saying so."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import rlhf
from rlhf_ray.errors import ConfigError
from rlhf_ray.run.run_lock import LOCK_FILE, STALE_S, RunLock, read_lock

REPO = Path(__file__).resolve().parent.parent
HOLD = """
import sys, time
from rlhf_ray.run.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/out, as a running driver does."""
    out = tmp_path / "out"
    out.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    yield out, process
    process.kill()
    process.wait()


def test_a_second_driver_on_a_directory_in_use_exits_2_and_changes_nothing(holder, capsys):
    out, process = holder
    unfinished = out / "ppo_checkpoints" / "step-4"  # the first run's checkpoint being written
    unfinished.mkdir(parents=True)
    (unfinished / "tensors.safetensors").write_bytes(b"partial")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    code = rlhf.main(["--config", "smoke", "--output_dir", str(out)])

    err = capsys.readouterr().err
    assert code == 2, err
    assert f"is in use by another run: host {socket.gethostname()}, pid {process.pid}" in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert read_lock(out / LOCK_FILE)["pid"] == process.pid  # still the first run's


def test_the_lock_of_a_killed_driver_on_this_host_is_taken_over(holder, capsys):
    out, process = holder
    with pytest.raises(ConfigError, match=f"pid {process.pid}"):
        RunLock(out).acquire()
    process.send_signal(signal.SIGKILL)  # no chance to release it
    process.wait()
    with RunLock(out):
        said = capsys.readouterr().out
        assert f"took over the lock of an earlier run (host {socket.gethostname()}, pid " in said
        assert f"process {process.pid} no longer exists" in said
        assert read_lock(out / LOCK_FILE)["pid"] == os.getpid()
    assert not (out / LOCK_FILE).exists()  # released on the way out


def test_a_lock_from_another_host_holds_while_refreshed_and_is_taken_over_when_stale(tmp_path):
    lock = tmp_path / LOCK_FILE
    other = {"host": "node-7", "pid": 1, "ray_job": "raysubmit_abc", "started": "earlier"}
    lock.write_text(json.dumps(other), encoding="utf-8")
    with pytest.raises(ConfigError, match="host node-7, pid 1, Ray job raysubmit_abc"):
        RunLock(tmp_path).acquire()
    long_ago = time.time() - STALE_S - 5
    os.utime(lock, (long_ago, long_ago))
    with RunLock(tmp_path):
        assert read_lock(lock)["host"] == socket.gethostname()


def test_a_run_after_a_run_that_ended_takes_the_lock_without_a_word(tmp_path, capsys):
    with RunLock(tmp_path):
        pass
    with RunLock(tmp_path):
        assert "took over" not in capsys.readouterr().out
