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

A cluster with Ray's token authentication lets this process in only with RAY_AUTH_MODE=token and
its token (jobs/commands.py: where Ray looks); ray.init retries a refusal for 20 s and then
calls it a failed connection. So one call to the GCS, as Ray makes it, asks first (with a
deadline), and a refusal is said to be the token's.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

from jobs.commands import AUTH_MODE, token_auth_on, token_location
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


TOKEN_PLACES = (
    "Ray reads the token from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else "
    "~/.ray/auth_token (`ray get-auth-token` on the cluster's head node prints the cluster's)"
)


class NoRunningJob(Exception):
    """Nothing to scale: no cluster at the address, or no rlhf-ray job running on it."""


class TokenRefused(Exception):
    """The cluster is there, but Ray's token authentication does not let this process in."""


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
        _ask_gcs(address)
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


def _ask_gcs(address: str) -> None:
    """One call to the GCS (its cluster id), within CONNECT_TIMEOUT_S, on a channel as Ray makes
    it, which carries the token where RAY_AUTH_MODE is token: a refused token raises
    TokenRefused, no answer NoRunningJob; any other failure is left to ray.init, which names it.
    (Ray has no public call for this: ray._private.)"""
    import grpc
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    from ray.exceptions import AuthenticationError

    channel = init_grpc_channel(address)
    try:
        gcs = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        gcs.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=CONNECT_TIMEOUT_S)
    except AuthenticationError:  # token mode, and no token where Ray looks
        raise TokenRefused(
            f"{AUTH_MODE} is token, but there is no token here: {TOKEN_PLACES}"
        ) from None
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise TokenRefused(_refusal(address)) from None
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise NoRunningJob(_no_answer(address)) from None
        if err.code() == grpc.StatusCode.UNAVAILABLE:  # it took the TCP connection: not gRPC
            raise NoRunningJob(f"no Ray GCS at {address!r}: {err.details()}; {EXPECTED}") from None
    finally:
        channel.close()


def _no_answer(address: str) -> str:
    return (
        f"no Ray GCS answered at {address!r} within {CONNECT_TIMEOUT_S} s (is it another "
        f"service's port?); {EXPECTED}"
    )


def _refusal(address: str) -> str:
    if token_auth_on():
        return (
            f"the Ray cluster at {address!r} refused the authentication token from "
            f"{token_location()}: it is not that cluster's token; {TOKEN_PLACES}"
        )
    return (
        f"the Ray cluster at {address!r} uses token authentication and this command sent no "
        f"token: set {AUTH_MODE}=token, as the command the job printed does; {TOKEN_PLACES}"
    )


def _connect(address: str) -> None:
    """ray.init, given up on after CONNECT_TIMEOUT_S (see the module's docstring)."""
    import ray
    from ray.exceptions import AuthenticationError

    failed: list[Exception] = []

    def init() -> None:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, AuthenticationError) as err:
            failed.append(err)

    connecting = threading.Thread(target=init, name="ray-connect", daemon=True)
    connecting.start()
    connecting.join(CONNECT_TIMEOUT_S)
    if connecting.is_alive():
        raise NoRunningJob(_no_answer(address))
    if failed and isinstance(failed[0], AuthenticationError):  # "auto": token mode, no token
        raise TokenRefused(f"{failed[0]}; {TOKEN_PLACES}") from None
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
