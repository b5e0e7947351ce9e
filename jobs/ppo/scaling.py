"""Rollout generators joining and leaving a running PPO job, between steps.

`rlhf-ray scale --rollout N` sets the target on the run's RunControl actor; before each batch is
asked for the driver starts or retires generators to reach it. A new generator loads the
learner's current weights before it samples; a retired one gets no more prompts and is stopped
once every batch it had to sample has been trained on or dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.run_control import RunControl
from jobs.cluster import alive_nodes
from jobs.ppo.roles import Roles, generator_name
from rlhf_ray.config import Config
from rlhf_ray.errors import ResourceError, RoleFailed
from rlhf_ray.ppo.scaling import CONTROL_PREFIX, scale_plan
from rlhf_ray.run.resources import check_fits, ppo_requests


def start_control(cfg: Config, out: Path) -> ray.actor.ActorHandle:
    """The run's control actor (the one already there if the driver made it before), on the
    driver's node: it takes no resources, so Ray could place it on any node, and a node that
    leaves (as with auto scaling) would take the run's control with it."""
    driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), False)
    return RunControl.options(
        name=CONTROL_PREFIX + str(out), get_if_exists=True, scheduling_strategy=driver_node
    ).remote(str(out), cfg.ppo.num_rollout_actors, cfg.ppo.autoscales)


def fitting_count(cfg: Config, target: int, current: int) -> int:
    """The most generators, up to `target`, the live nodes can hold beside the other roles
    (never fewer than `current` or `target`, whichever is smaller: those already run)."""
    for count in range(target, current, -1):
        try:
            check_fits(ppo_requests(cfg.resources, count), alive_nodes(), "")
            return count
        except ResourceError:
            continue
    return min(target, current)


class GeneratorScaler:
    def __init__(self, cfg: Config, roles: Roles, control: ray.actor.ActorHandle | None) -> None:
        self.cfg, self.roles, self.control = cfg, roles, control
        # retired generators, each with the serial of the first batch asked for without it
        self.retiring: list[tuple[ray.actor.ActorHandle, int]] = []
        self.told: tuple[int, int] | None = None  # (asked, running) the user was last told of

    def rescale(self, get: Callable, serial: int) -> None:
        """Start or retire generators to reach the control's target, or with auto scaling as
        many as the live nodes hold within the bounds, before batch `serial` is asked for;
        `get` waits on refs."""
        if self.control is None:
            return
        asked, auto = get(self.control.rollout_target.remote(), "reading the run control")
        current, ppo = len(self.roles.generators), self.cfg.ppo
        if auto:
            target = max(
                ppo.min_rollout_actors, fitting_count(self.cfg, ppo.max_rollout_actors, current)
            )
        else:
            target = fitting_count(self.cfg, asked, current)
            if target < asked and self.told != (asked, target):  # once, not every step
                self.told = (asked, target)
                print(
                    f"[ppo] rlhf-ray scale asked for {asked} rollout generators; the live nodes "
                    f"hold {target} beside the other roles: running {target}",
                    flush=True,
                )
        plan = scale_plan(list(self.roles.generators), target, self.roles.next_rank)
        if not plan:
            return
        for rank in plan.retire:
            self.retiring.append((self.roles.generators.pop(rank), serial))
        started = self.roles.start_generators(list(plan.start))
        get([g.ready.remote() for g in started.values()], "starting rollout generators")
        names = ", ".join(map(generator_name, plan.start or plan.retire))
        print(
            f"[ppo] rollout generators: {current} -> {len(self.roles.generators)} "
            f"({'started' if plan.start else 'retiring'} {names})",
            flush=True,
        )

    def replace_lost(self, ranks: list[int], get: Callable, serial: int) -> list[int]:
        """Drop generators that died (auto scaling: their node left), start others where the
        live nodes have room; -> the ranks alive now, to take over the lost ones' rows."""
        self.drop(ranks)
        self.rescale(get, serial)
        if not self.roles.generators:
            raise RoleFailed("every rollout generator was lost and the live nodes hold no new one")
        return list(self.roles.generators)

    def drop(self, ranks: list[int]) -> None:
        """Forget generators that died (auto scaling: their node left)."""
        for rank in ranks:
            ray.kill(self.roles.generators.pop(rank), no_restart=True)
        names = ", ".join(map(generator_name, ranks))
        print(f"[ppo] lost {names}; the others sample its rows from now on", flush=True)

    def use_ranks(self, ranks: list[int], get: Callable) -> None:
        """Exactly the generators of `ranks` (a checkpoint's), started or stopped as needed."""
        for rank in [r for r in self.roles.generators if r not in ranks]:
            ray.kill(self.roles.generators.pop(rank), no_restart=True)
        started = self.roles.start_generators([r for r in ranks if r not in self.roles.generators])
        get([g.ready.remote() for g in started.values()], "starting rollout generators")

    def release_retired(self, oldest_waiting: int) -> None:
        """Stop the retired generators whose batches are all trained on or dropped: the
        oldest batch still waiting has serial `oldest_waiting`."""
        done = [(g, serial) for g, serial in self.retiring if serial <= oldest_waiting]
        for generator, _ in done:
            ray.kill(generator, no_restart=True)
        self.retiring = [pair for pair in self.retiring if pair not in done]

    def report(self, step: int) -> None:
        """Tell the control (for `rlhf-ray scale` to print) where the run is; not waited on."""
        if self.control is not None:
            alive = list(map(generator_name, self.roles.generators))
            self.control.report.remote({"step": step, "generators": alive})
