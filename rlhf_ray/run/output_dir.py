"""The output directory is checked first: a run must be able to write there before any work."""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_ray.errors import ConfigError

PROBE = ".rlhf-ray-write-test"


def check_output_dir(path: str) -> Path:
    """`run.output_dir` as an absolute path, created if missing, shown to be writable.

    Writing and deleting a small file catches every way a directory cannot hold a run (a file
    in its place, no permission, a read-only or pseudo file system such as /proc, a name the
    file system refuses as too long) with the operating system's own words for it.
    """
    where = Path(path).absolute()
    probe = where / f"{PROBE}-{os.getpid()}"
    try:
        if where.exists() and not where.is_dir():
            raise ConfigError(f"run.output_dir={path!r}: {where} is a file; expected a directory")
        where.mkdir(parents=True, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as handle:
            handle.write("ok\n")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as err:
        reason = err.strerror or str(err)
        raise ConfigError(
            f"run.output_dir={path!r}: cannot write in {where} ({reason}); expected a directory "
            "this user can create and write (on a cluster, storage every node mounts)"
        ) from err
    return where
