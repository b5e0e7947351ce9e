"""Waiting on Ray from the PPO driver: every wait has a deadline, watches that the live nodes
can still hold the roles, and turns Ray's errors into ones that name the role and the stage."""

from __future__ import annotations

import time
from collections.abc import Callable

import ray
from ray.exceptions import RayActorError

from jobs.cluster import alive_nodes
from rlhf_ray.config import Config
from rlhf_ray.errors import ResourceError, RoleFailed, UserInputError
from rlhf_ray.run.resources import check_fits, ppo_requests

WATCH_EVERY_S = 2.0  # how often a wait checks that the live nodes can still hold the roles


def capacity_watch(cfg: Config, generators: int) -> Callable[[], None]:
    """A check, run while the driver waits, that the nodes alive now can still hold every PPO
    role (with `generators` rollout generators): after a node is lost with no spare capacity,
    Ray would keep the roles' restarts pending until run.ray_timeout_s; this names the problem
    within seconds instead."""
    requests = ppo_requests(cfg.resources, generators)

    def check() -> None:
        try:
            check_fits(requests, alive_nodes(), "the PPO phase")
        except ResourceError as err:
            raise RoleFailed(
                f"nodes left the cluster and the rest cannot hold the roles: {err}"
            ) from None

    return check


def wait_ready(refs: list, timeout: float, what: str, watch: Callable[[], None] | None) -> None:
    """Block until every ref is ready (a value or an error), checking `watch` meanwhile."""
    deadline = time.monotonic() + timeout
    waiting = list(refs)
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{what} took longer than run.ray_timeout_s={timeout:g}s")
        _, waiting = ray.wait(
            waiting, num_returns=len(waiting), timeout=min(WATCH_EVERY_S, left), fetch_local=False
        )
        if waiting and watch is not None:
            watch()


def get_results(
    refs,
    timeout: float,
    what: str,
    died: type[RoleFailed] = RoleFailed,
    watch: Callable[[], None] | None = None,
):
    """ray.get, with errors that say what the driver was waiting for and which role failed;
    `died` is raised when the actor called is gone for good."""
    wait_ready(refs if isinstance(refs, list) else [refs], timeout, what, watch)
    try:
        return ray.get(refs)
    except RoleFailed as err:  # raised in the learner about another role
        raise RoleFailed(f"{what}: {getattr(err, 'cause', err)}") from None
    except UserInputError as err:  # e.g. a reward function that raised: the user's own message
        raise getattr(err, "cause", err) from None
    except RayActorError as err:  # the actor called here is gone for good
        raise died(f"{what}: {err}") from None
