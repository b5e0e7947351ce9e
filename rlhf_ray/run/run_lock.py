"""One run per output directory: a lock file naming the run that holds it.

A second driver on the same `run.output_dir` would delete the first's checkpoint in progress
and attach to its RunControl; it is refused before it touches anything. The lock names the
holder (host, pid, Ray job submission id, start time) and is refreshed every HEARTBEAT_S by a
thread of the holder. A lock whose owner is gone is taken over, and the console says so: on the
same host when its process no longer exists, on another host (storage every node mounts) when
it was not refreshed for STALE_S.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from rlhf_ray.errors import ConfigError

LOCK_FILE = ".rlhf-ray.lock"
HEARTBEAT_S = 10.0
STALE_S = 60.0  # a holder on another host that has not refreshed its lock this long is gone


class RunLock:
    """Held from `acquire` to `release` (or the process's end); `with RunLock(out):` does both."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_FILE
        self.owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "ray_job": ray_submission_id(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "token": uuid.uuid4().hex,  # which of two processes that raced wrote the file
        }
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or ConfigError naming the run that holds it."""
        held = read_lock(self.path)
        if held is not None:
            why_gone = gone_because(held, self.path)
            if why_gone is None:
                raise ConfigError(
                    f"run.output_dir {self.path.parent} is in use by another run: "
                    f"{describe(held)}. Wait for it to end (or stop it: `ray job stop`), or "
                    "give this run another run.output_dir"
                )
            print(f"[run] took over the lock of an earlier run ({describe(held)}): {why_gone}")
        self._write()
        if read_lock(self.path) != self.owner:  # another process took it at the same moment
            raise ConfigError(
                f"run.output_dir {self.path.parent} was just taken by another run: "
                f"{describe(read_lock(self.path) or {})}"
            )
        self._heartbeat = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._heartbeat.start()

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if read_lock(self.path) == self.owner:
            self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        """Atomically: a reader sees the old lock or this one, never half a file."""
        part = self.path.with_name(f"{LOCK_FILE}.{self.owner['token']}")
        part.write_text(json.dumps(self.owner) + "\n", encoding="utf-8")
        os.replace(part, self.path)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if read_lock(self.path) == self.owner:
                    os.utime(self.path)
            except OSError:
                pass  # storage gone for a moment: the next beat tries again


def read_lock(path: Path) -> dict | None:
    """The holder a lock file names; None where there is none. An unreadable or half-written
    lock (a crash mid-write on storage without atomic rename) counts as none."""
    try:
        held = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return held if isinstance(held, dict) else None


def gone_because(held: dict, path: Path) -> str | None:
    """Why the holder of a lock is gone, or None while it may still run."""
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return "its lock file is gone"
    if age > STALE_S:
        return f"its lock was last refreshed {age:.0f}s ago"
    if held.get("host") == socket.gethostname() and not process_exists(held.get("pid")):
        return f"process {held.get('pid')} no longer exists"
    return None


def process_exists(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def describe(held: dict) -> str:
    job = f", Ray job {held['ray_job']}" if held.get("ray_job") else ""
    return (
        f"host {held.get('host', '?')}, pid {held.get('pid', '?')}{job}, "
        f"started {held.get('started', '?')}"
    )


def ray_submission_id() -> str | None:
    """The `ray job submit` submission id of this driver, where Ray Jobs started it."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    except ValueError:
        return None
    return (config.get("metadata") or {}).get("job_submission_id")
