"""Asking Ray, before any actor exists, whether it can place a phase's bundles.

The totals check (rlhf_ray/run/resources.py `check_fits`) adds up the nodes: a cluster with
enough CPUs or GPUs in total can still be unable to place a group (three 0.6-CPU train workers
on two 1-CPU nodes), and the phase would wait on Ray until run.ray_timeout_s. So each group is
created as a placement group, Ray's answer read from its scheduling state, and the group removed:

  FINISHED      placed: the group fits.
  INFEASIBLE    no live node can ever hold one of its bundles.
  NO_RESOURCES  not now. Ray answers this both when other work holds what the group needs and
                when no set of the live nodes can ever hold it: for PACK and SPREAD it says
                INFEASIBLE only of a bundle that fits no node. The two are told apart by Ray's
                own retries: a group it still cannot place on a retry begun while every resource
                the group asks for was free (but what this check holds) never fits, and is
                refused. Otherwise others hold what it needs: said, and not refused, since they
                may free it (the phase then waits, up to run.ray_timeout_s).
"""

from __future__ import annotations

import time

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

from rlhf_ray.errors import ResourceError
from rlhf_ray.run.resources import BundleGroup, PhaseResources, describe_bundle

# The longest the check waits on a group that others keep Ray from placing now. Ray retries a
# pending group about once a second (measured), and a group that never fits is known within the
# second retry after the cluster is seen free, so a refusal comes in about 2 s.
WAIT_S = 10.0
POLL_S = 0.05
RELEASE_WAIT_S = 2.0  # the longest the check waits for Ray to show removed groups' resources free
RETRIES_WHILE_FREE = 2  # the first retry may have begun before Ray's view showed the freed room

PLACED, NEVER, BUSY = "placed", "never", "busy"


def check_placement(phase: PhaseResources, nodes: list[dict[str, float]]) -> None:
    """Place `phase.groups` in order, each held while the next is tried (as the phase places
    them); ResourceError naming the group Ray can never place on the live `nodes`."""
    held: list[PlacementGroup] = []
    placed: list[BundleGroup] = []
    holding: dict[str, float] = {}  # resources the groups placed so far reserve
    try:
        for group in phase.groups:
            bundles = group.bundles()
            if not bundles:
                continue
            held.append(placement_group(bundles, strategy=group.strategy))
            answer = ray_answer(held[-1], asked_names(bundles), holding)
            if answer == NEVER:
                raise ResourceError(refusal(phase.what, group, placed, nodes))
            if answer == BUSY:  # the groups after it cannot be tried beside it
                print(busy_note(phase.what, group), flush=True)
                return
            placed.append(group)
            for one in bundles:
                for name, amount in one.items():
                    holding[name] = holding.get(name, 0.0) + amount
    finally:
        release(held, holding)


def release(groups: list[PlacementGroup], holding: dict[str, float]) -> None:
    """Remove the groups, and wait until Ray shows what they held free again (tens of ms,
    measured): a group created before that is answered "no resources" and retried only about a
    second later."""
    free_before = ray.available_resources()
    for group in groups:
        remove_placement_group(group)
    deadline = time.monotonic() + RELEASE_WAIT_S
    while time.monotonic() < deadline:
        free = ray.available_resources()
        if all(
            free.get(n, 0.0) >= free_before.get(n, 0.0) + held - 1e-6 for n, held in holding.items()
        ):
            return
        time.sleep(POLL_S)


def ray_answer(group: PlacementGroup, asked: set[str], holding: dict[str, float]) -> str:
    """PLACED, NEVER or BUSY (still pending after WAIT_S while others hold resources)."""
    deadline = time.monotonic() + WAIT_S
    free_at_attempt: int | None = None  # Ray's attempt count when the cluster was seen free
    while True:
        stats = placement_group_table(group)["stats"]
        state, attempt = stats["scheduling_state"], stats["scheduling_attempt"]
        if state == "FINISHED":
            return PLACED
        if state == "INFEASIBLE":
            return NEVER
        if state == "NO_RESOURCES":
            if not cluster_is_free(asked, holding):
                free_at_attempt = None  # another job holds part of it: Ray's "no" says nothing
            elif free_at_attempt is None:
                free_at_attempt = attempt
            elif attempt >= free_at_attempt + RETRIES_WHILE_FREE:
                return NEVER
        if time.monotonic() >= deadline:
            return BUSY
        time.sleep(POLL_S)


def cluster_is_free(asked: set[str], holding: dict[str, float]) -> bool:
    """Whether every resource in `asked` is free on every node, but what this check holds."""
    total, free = ray.cluster_resources(), ray.available_resources()
    return all(
        free.get(name, 0.0) + holding.get(name, 0.0) >= total.get(name, 0.0) - 1e-6
        for name in asked
    )


def asked_names(bundles: list[dict[str, float]]) -> set[str]:
    return {name for one in bundles for name in one}


def refusal(
    what: str, group: BundleGroup, placed: list[BundleGroup], nodes: list[dict[str, float]]
) -> str:
    """Names the group, what it was placed beside, the live nodes and the settings to change."""
    asked = sorted(asked_names(group.bundles() + [b for g in placed for b in g.bundles()]))
    largest_first = sorted(nodes, key=lambda node: [node.get(n, 0.0) for n in asked], reverse=True)
    have = "; ".join(
        describe_bundle({n: node.get(n, 0.0) for n in asked}) for node in largest_first
    )
    totals = ", ".join(f"{n}={sum(node.get(n, 0.0) for node in nodes):g}" for n in asked)
    beside = "".join(f" beside {g.name} ({g.describe()})" for g in placed)
    return (
        f"{what}: Ray cannot place {group.name} ({group.describe()}){beside} on the live nodes "
        f"({have}), even with every node free: the cluster has {totals} in all, but a bundle "
        f"cannot be split across nodes{group.hint}. Ask for fewer or smaller bundles "
        f"({group.settings}), or add nodes"
    )


def busy_note(what: str, group: BundleGroup) -> str:
    free = ray.available_resources()
    now = ", ".join(f"{n}={free.get(n, 0.0):g}" for n in sorted(asked_names(group.bundles())))
    return (
        f"[resources] {what}: Ray cannot place {group.name} ({group.describe()}) now, while "
        f"other work holds part of the cluster (free: {now}). Not refused: it may be freed, and "
        "the phase waits for it up to run.ray_timeout_s"
    )
