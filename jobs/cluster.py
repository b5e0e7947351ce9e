"""Connecting to Ray and checking, before any actor exists, that the cluster can run the roles."""

from __future__ import annotations

import logging
import os

import ray

from rlhf_ray.config import ResourcesConfig, RunConfig
from rlhf_ray.run.console import is_verbose
from rlhf_ray.run.resources import RoleRequest, check_fits, check_learner_threads


def connect(run: RunConfig) -> str:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), or start a local one.

    The local dashboard binds to 127.0.0.1 only. Returns a description for the console.
    """
    if ray.is_initialized():  # e.g. a test session's local Ray
        return "using the Ray already initialised in this process"
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return f"joined the Ray cluster at {os.environ['RAY_ADDRESS']}"
    context = ray.init(
        address="local",  # a new local Ray, never one that `ray start` left on this machine
        num_cpus=run.num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_level=logging.INFO if is_verbose() else logging.WARNING,
    )
    return f"started a local Ray; dashboard at http://{context.dashboard_url or 'n/a'}"


def alive_nodes() -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def check_resources(requests: list[RoleRequest], what: str) -> None:
    """Raise ResourceError (exit 2) when the live cluster can never satisfy `requests`."""
    check_fits(requests, alive_nodes(), what)


def check_threads(res: ResourcesConfig) -> None:
    """Raise ResourceError (exit 2) when the learner asks for more threads than a node has."""
    check_learner_threads(res, alive_nodes())
