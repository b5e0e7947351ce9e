"""`rlhf-ray scale --rollout N`: change the number of rollout generators of a running job.

    rlhf-ray scale --rollout N [--address HOST:PORT] [--output_dir DIR]

It joins the cluster (`--address`, else RAY_ADDRESS, else the Ray running on this machine),
finds the running job's control actor (named after its output directory; `--output_dir` picks
one when several jobs run) and sets the target there. The PPO driver applies it before its
next step: new generators load the current policy weights before they sample, retired ones
finish the batch they made. The count asked for is checked before anything connects.

Ray's own connect retries a GCS that is not there for over a minute and, its SIGTERM handler
being Python's, cannot be stopped meanwhile. So the address is checked first (jobs/ray_address:
the dashboard's http URL is refused, the GCS port must take a TCP connection within seconds), and
Ray connects in a background thread that is given up on after CONNECT_TIMEOUT_S: the main thread
stays free to end the process on SIGTERM (Ray installs no handler off the main thread).
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

from jobs.ray_address import (
    CONNECT_TIMEOUT_S,
    EXPECTED,
    NoRayCluster,
    check_gcs_reachable,
    host_and_port,
)
from rlhf_ray.errors import UserInputError
from rlhf_ray.ppo.scaling import CONTROL_PREFIX, check_generator_count

SCALE_JOINS = "scale joins the cluster itself, at --address or RAY_ADDRESS"


class NoRunningJob(Exception):
    """Nothing to scale: no cluster at the address, or no rlhf-ray job running on it."""


def scale(argv: list[str]) -> dict:
    """Parse, connect, set the target; -> the control's answer (target, step, generators)."""
    args = parse_scale_args(argv)
    import ray

    address = args.address or _default_address()
    if address != "auto":
        host, port = host_and_port(address, "--address", SCALE_JOINS)
        try:
            check_gcs_reachable(host, port)
        except NoRayCluster as err:
            raise NoRunningJob(str(err)) from None
    _connect(address)
    try:
        control = ray.get_actor(**_find_control(args.output_dir))
        return ray.get(control.scale_rollout.remote(args.rollout), timeout=60)
    finally:
        ray.shutdown()


def parse_scale_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rlhf-ray scale", description=__doc__.split("\n")[0])
    parser.add_argument("--rollout", required=True, help="rollout generators from the next step")
    parser.add_argument("--address", help="the cluster (HOST:PORT of its GCS, or 'auto')")
    parser.add_argument("--output_dir", help="which job, by its run.output_dir")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse printed the usage (and for --help, exits 0)
        if exit_.code == 0:
            raise
        raise UserInputError("rlhf-ray scale: see the usage above") from exit_
    try:
        count = int(args.rollout)
    except ValueError:
        count = args.rollout
    args.rollout = check_generator_count(count, "rlhf-ray scale --rollout")
    return args


def _default_address() -> str:
    """RAY_ADDRESS when it names a GCS, else "auto" (the Ray running on this machine). The
    dashboard URL `ray job submit` uses is dropped from the environment: ray.init would read it
    back for "auto" and fail on it."""
    env = os.environ.get("RAY_ADDRESS", "")
    if env.startswith(("http://", "https://")):
        del os.environ["RAY_ADDRESS"]
        return "auto"
    return env or "auto"


def _connect(address: str) -> None:
    """ray.init, given up on after CONNECT_TIMEOUT_S (see the module's docstring)."""
    import ray

    failed: list[Exception] = []

    def init() -> None:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        except ConnectionError as err:
            failed.append(err)

    connecting = threading.Thread(target=init, name="ray-connect", daemon=True)
    connecting.start()
    connecting.join(CONNECT_TIMEOUT_S)
    if connecting.is_alive():
        raise NoRunningJob(
            f"no Ray GCS answered at {address!r} within {CONNECT_TIMEOUT_S} s (is it another "
            f"service's port?); {EXPECTED}"
        )
    if failed:
        raise NoRunningJob(f"no Ray cluster at {address!r}: {failed[0]}") from None


def _find_control(output_dir: str | None) -> dict:
    """name= and namespace= of the one control actor meant, among every namespace's."""
    import ray

    controls = [
        actor
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(CONTROL_PREFIX)
    ]
    if output_dir is not None:
        wanted = CONTROL_PREFIX + str(Path(output_dir).resolve())
        controls = [actor for actor in controls if actor["name"] == wanted]
    if not controls:
        which = f" writing to {output_dir}" if output_dir else ""
        raise NoRunningJob(f"no rlhf-ray job{which} is running on this cluster")
    if len(controls) > 1:
        dirs = ", ".join(a["name"].removeprefix(CONTROL_PREFIX) for a in controls)
        raise UserInputError(f"several rlhf-ray jobs are running ({dirs}): pick one --output_dir")
    return controls[0]
