"""What the driver prints for a person to act on, written so that it works as printed: the
`rlhf-ray scale` command of a running job, and where the dashboard's token is.

Ray's token authentication (on by default for a local Ray since Ray 2.5x) lets a client in only
with RAY_AUTH_MODE=token set and the cluster's token where Ray's loader looks: the RAY_AUTH_TOKEN
variable, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token (which a new local Ray
writes when there is none). Ray sends the token only to a cluster found on this machine
(`address="auto"`), never to an address given by hand, so the printed command sets the mode.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

AUTH_MODE = "RAY_AUTH_MODE"


def token_auth_on() -> bool:
    """Whether this process talks to Ray with its token (as a local Ray started here does)."""
    return os.environ.get(AUTH_MODE, "").lower() == "token"


def token_location() -> str:
    """Where Ray's loader takes the token from in this process, in its order."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN variable"
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"


def dashboard_token_note() -> str:
    """What the dashboard page asks for, said beside its URL ("" without token auth)."""
    if not token_auth_on():
        return ""
    return f" (it asks for Ray's token: the one in {token_location()})"


def scale_command(gcs_address: str, output_dir: Path) -> str:
    """The `rlhf-ray scale` line of a running job, as a shell on this machine runs it."""
    auth = f"{AUTH_MODE}=token " if token_auth_on() else ""
    return (
        f"{auth}{rlhf_ray_script()} scale --rollout N --address {gcs_address} "
        f"--output_dir {output_dir}"
    )


def rlhf_ray_script() -> str:
    """`rlhf-ray` where PATH finds this install's script; else its path (`make run` leaves
    .venv/bin off PATH), relative to the working directory when under it; without the script
    (a checkout run as `python jobs/rlhf.py`), this Python on the module."""
    beside = Path(sys.executable).parent / "rlhf-ray"
    on_path = shutil.which("rlhf-ray")
    if on_path and (not beside.is_file() or Path(on_path).resolve() == beside.resolve()):
        return "rlhf-ray"
    if beside.is_file():
        return _shortest(beside)
    return f"{_shortest(Path(sys.executable))} -m jobs.cli"


def _shortest(path: Path) -> str:
    """`path` relative to the working directory when under it (it has a slash, so a shell runs
    the file), else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)
