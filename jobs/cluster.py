"""The Ray the run uses, and checking, before any work, that it can hold what the run asks.

A cluster (RAY_ADDRESS) is joined before the data is prepared, so that its nodes can be checked
first; a local Ray is checked as it will start (`local_node`) and started only once the data is
ready, so a request no node can hold is refused before anything is written or started.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
import ray._private.utils
import torch

from jobs.commands import dashboard_token_note
from jobs.placement import check_placement
from jobs.ray_address import check_gcs_reachable, host_and_port
from rlhf_ray.config import ResourcesConfig, RunConfig
from rlhf_ray.run.console import is_verbose
from rlhf_ray.run.resources import PhaseResources, check_fits, check_learner_threads

DASHBOARD_PORT = 8265  # Ray's default, where a user of Ray looks first
RAY_TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def join_cluster() -> str | None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`); -> the console line, or None
    where there is none to join (no address, or a Ray this process holds already)."""
    address = os.environ.get("RAY_ADDRESS")
    if not address or ray.is_initialized():
        return None
    check_address(address)
    ray.init(address=address)
    return f"joined the Ray cluster at {address}"


def check_address(address: str) -> None:
    """RAY_ADDRESS names a GCS that takes connections ("auto", the Ray running on this machine,
    and a Ray Client's ray:// address are left to Ray): before, the dashboard's URL or a
    malformed address was a traceback, and a GCS not there a minute and more of retries."""
    if address == "auto" or address.startswith("ray://"):
        return
    use = (
        "to run on that cluster, submit the run there (`ray job submit --address URL "
        "--working-dir . -- python jobs/rlhf.py ...`), or set RAY_ADDRESS to the GCS address"
    )
    check_gcs_reachable(*host_and_port(address, "RAY_ADDRESS", use))


def start_local(run: RunConfig) -> str:
    """Start a local Ray of exactly `local_node(run)`, which the run was checked against.

    The local dashboard binds to 127.0.0.1 only. Returns a description for the console.
    """
    if ray.is_initialized():  # e.g. a test session's local Ray
        return "using the Ray already initialised in this process"
    node = local_node(run)
    # Ray turns token authentication on for a new local Ray unless RAY_AUTH_MODE says otherwise,
    # and warns that it did; the line returned says so instead, with where the token is.
    logging.getLogger(RAY_TOKEN_SETUP_LOGGER).setLevel(logging.ERROR)
    with one_local_start_at_a_time():
        port = dashboard_port()
        set_local_ray_environment(port)
        context = ray.init(
            address="local",  # a new local Ray, never one that `ray start` left on this machine
            num_cpus=int(node["CPU"]),
            num_gpus=int(node.get("GPU", 0)),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            logging_level=logging.INFO if is_verbose() else logging.WARNING,
        )
    url = f"http://{context.dashboard_url}" if context.dashboard_url else "n/a"
    return f"started a local Ray; dashboard at {url}{dashboard_token_note()}"


def set_local_ray_environment(dashboard: int) -> None:
    """What the local Ray's processes (started from this one, they inherit its environment) need
    to know, set before it starts.

    - RAY_API_SERVER_ADDRESS, this Ray's dashboard: Ray Train's PlacementGroupCleaner asks the
      state API whether its controller lives, and without an address looks for "the" Ray on this
      machine; with another one running, its thread died with "Found multiple active Ray
      instances" (and no longer cleaned up after a dead controller).
    - RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0: Ray Train's PreemptionWatcher watches for nodes
      being drained, which a local Ray's one node never is; it costs a process per phase, and
      Ray Train passes it actor handles, which Ray reports at level E (ray-project/ray#53727).
      Kept where the user set it.
    """
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@contextmanager
def one_local_start_at_a_time() -> Iterator[None]:
    """Runs started together on one machine each found 8265 free, and all but the first
    local Ray then failed to bind it ("Failed to find a valid port for dashboard", seen with
    three runs launched at once): their port choice and start take turns under a file lock,
    so each later one finds the port taken and picks another."""
    with open(Path(tempfile.gettempdir()) / "rlhf-ray-local-start.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def dashboard_port() -> int:
    """Ray's 8265 where it is free on 127.0.0.1, else a free port (another Ray's dashboard may
    hold 8265): chosen here, so that RAY_API_SERVER_ADDRESS can name it before Ray starts."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", DASHBOARD_PORT))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def local_node(run: RunConfig) -> dict[str, float]:
    """The one node of the local Ray `start_local` starts, known without starting it:
    run.num_cpus CPUs (unset: as many as Ray itself detects, a container's limit included) and
    every GPU torch sees (Ray's own count may include GPUs this torch cannot use)."""
    node = {"CPU": float(run.num_cpus or ray._private.utils.get_num_cpus())}
    gpus = torch.cuda.device_count()
    return node | {"GPU": float(gpus)} if gpus else node


def describe_local_node(run: RunConfig) -> str:
    node = local_node(run)
    cpus = "run.num_cpus" if run.num_cpus else "this machine's; run.num_cpus unset"
    return f"CPU={node['CPU']:g} ({cpus}) and GPU={node.get('GPU', 0):g} (the GPUs torch sees)"


def nodes_to_check(run: RunConfig) -> list[dict[str, float]]:
    """The nodes the run will have: the live ones of the Ray this process holds (joined, or a
    test session's), else the local Ray's one node as it will start."""
    return alive_nodes() if ray.is_initialized() else [local_node(run)]


def alive_nodes() -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def check_resources(phase: PhaseResources, nodes: list[dict[str, float]]) -> None:
    """Raise ResourceError (exit 2) when `nodes` can never hold what `phase` asks at one time.

    Every bundle must fit some node and the roles together the cluster (named plainly by
    check_fits); on several live nodes Ray is then asked whether it can place the phase's
    groups. On one node the totals are exact already: every bundle goes on that node.
    """
    check_fits(phase.requests, nodes, phase.what)
    if ray.is_initialized() and len(nodes) > 1:
        check_placement(phase, nodes)


def check_threads(res: ResourcesConfig, nodes: list[dict[str, float]]) -> None:
    """Raise ResourceError (exit 2) when the learner asks for more threads than a node has."""
    check_learner_threads(res, nodes)
