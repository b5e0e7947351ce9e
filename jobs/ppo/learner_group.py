"""The PPO learner as the driver sees it: `resources.learner_workers` PPOLearner ranks in one
Ray placement group, joined in one torch.distributed group (rlhf_ray/ppo/data_parallel.py).

The driver calls the group as it called the single learner; a call returns a `GroupCall` (a
ref per rank that takes part) and `LearnerGroup.results` waits for all of them. A rank that
dies ends the call at once with `LearnerDied` naming it (the others, left waiting in a
collective, are stopped with the group), and `run_ppo` rebuilds the group from the newest
checkpoint. Rank 0 alone answers what every rank holds alike: the weights the generators
load (put once per update) and the export; the checkpoint's weights and optimizers come from
rank 0 too, with every rank taking part (a critic sharded by FSDP2 is gathered whole).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.ppo_learner import PPOLearner
from jobs.ppo.waiting import WATCH_EVERY_S, get_results
from rlhf_ray.config import Config
from rlhf_ray.errors import RoleFailed
from rlhf_ray.ppo.data_parallel import Ranks
from rlhf_ray.ppo.settings import LearnerSettings
from rlhf_ray.run import saved_state
from rlhf_ray.run.resources import actor_options, bundle


def in_bundle(placement: PlacementGroup | None, index: int) -> dict:
    """Ray's `.options(...)` for an actor in bundle `index` of `placement` (None: anywhere)."""
    if placement is None:
        return {}
    strategy = PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=index)
    return {"scheduling_strategy": strategy}


class LearnerDied(RoleFailed):
    """A learner rank's process is gone; `run_ppo` rebuilds the roles from the newest
    checkpoint."""


# How long a rank's failure waits for the other ranks' calls before it is reported as its own:
# when a rank is killed, the rank left in the collective with it may fail first (gloo:
# "Connection reset by peer"), before Ray reports the killed rank's call as lost (1 in 6 runs
# of the kill test in tests/test_learner_group.py on a loaded 2-core machine).
PEER_DEATH_GRACE_S = 10.0


def _raise_if_one_died(others: list, names: dict, what: str) -> None:
    """LearnerDied naming a rank among `others` (its pending call refs) whose process is gone,
    if one is within PEER_DEATH_GRACE_S: the run then rebuilds the group, as it does when the
    dead rank's answer comes first. Returns when none is (the failure is the caller's own)."""
    if not others:
        return
    done, _ = ray.wait(others, num_returns=len(others), timeout=PEER_DEATH_GRACE_S)
    for ref in done:
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.RayActorError as err:
            raise LearnerDied(f"{what} ({names[ref]}): {err}") from None
        except Exception:  # noqa: BLE001 - a rank that failed waiting for the dead one
            continue


def learner_names(workers: int) -> list[str]:
    """The ranks' actor names, as the dashboard and roles/<name>_busy show them."""
    return ["learner"] if workers == 1 else [f"learner-{r}" for r in range(workers)]


@dataclass
class GroupCall:
    refs: list  # one ObjectRef per rank called, in rank order
    # the call's result from every rank's: by default rank 0's (every rank returns the same)
    combine: Callable[[list], object] = field(default=lambda values: values[0])


def ranks_results(
    call: GroupCall,
    names: list[str],
    timeout: float,
    what: str,
    watch: Callable[[], None] | None = None,
):
    """The call's result once every rank has answered. The first rank to fail ends the wait:
    one that died raises LearnerDied naming it, without waiting for the others (which would
    wait in a collective until run.ray_timeout_s); so does one that failed because another
    died (`_raise_if_one_died`). `names[i]` is rank i's."""
    deadline = time.monotonic() + timeout
    name_of = dict(zip(call.refs, names, strict=False))
    waiting, values = list(call.refs), {}
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{what} took longer than run.ray_timeout_s={timeout:g}s")
        done, waiting = ray.wait(waiting, num_returns=1, timeout=min(WATCH_EVERY_S, left))
        for ref in done:
            where = what if len(names) == 1 else f"{what} ({name_of[ref]})"
            try:
                values[ref] = get_results(ref, timeout, where, LearnerDied)
            except LearnerDied:
                raise
            except Exception:
                _raise_if_one_died(waiting, name_of, what)
                raise
        if waiting and watch is not None:
            watch()
    return call.combine([values[ref] for ref in call.refs])


class LearnerGroup:
    def __init__(self, cfg: Config, settings: LearnerSettings) -> None:
        """Place the ranks (not yet waited for: `connect` does) in one placement group."""
        res = cfg.resources
        self.workers, self.timeout = res.learner_workers, cfg.run.ray_timeout_s
        self.names = learner_names(self.workers)
        one = bundle(res.learner_cpus, res.learner_gpus)
        # Ray refuses a bundle of nothing: a learner asking for no resources goes anywhere
        self.placement = (
            placement_group([one] * self.workers, strategy=res.learner_placement.upper())
            if any(one.values())
            else None
        )
        self.ranks = [
            PPOLearner.options(
                name=name,
                **actor_options(res.learner_cpus, res.learner_gpus),
                **self._placed(rank),
            ).remote(settings, self.timeout, Ranks(rank, self.workers))
            for rank, name in enumerate(self.names)
        ]

    def _placed(self, rank: int) -> dict:
        return in_bundle(self.placement, rank)

    @property
    def chief(self) -> ray.actor.ActorHandle:
        return self.ranks[0]

    @property
    def chief_name(self) -> str:
        """Rank 0's actor name: generators find the weights by it (rollout_generator.py: why)."""
        return self.names[0]

    def ready(self) -> list:
        return [rank.ready.remote() for rank in self.ranks]

    def connect(self, watch: Callable[[], None] | None = None) -> None:
        """Once every rank is up: the ranks join one process group at rank 0's address."""
        if self.workers == 1:
            return
        meeting = GroupCall([self.chief.address.remote()])
        address, port = self.results(meeting, "the learner group's address", watch)
        joined = [rank.join.remote(address, port) for rank in self.ranks]
        self.results(GroupCall(joined), "joining the learner ranks' process group", watch)

    def train(self, shards: list[tuple], scores: list) -> GroupCall:
        return GroupCall([rank.train.remote(shards, scores) for rank in self.ranks])

    def version(self) -> GroupCall:
        """Rank 0's count of updates done (every rank's is the same)."""
        return GroupCall([self.chief.version.remote()])

    def weights(self):
        """Rank 0's weights: the ref every generator loads (every rank holds the same)."""
        return self.chief.weights.remote()

    def checkpoint_state(self) -> GroupCall:
        """(tensors, JSON state): rank 0's weights, optimizers, RNG and version, and the RNG of
        every other rank under rank<r>/rng/. Every rank takes part: a critic sharded over them
        is gathered whole."""
        refs = [rank.checkpoint_state.remote() for rank in self.ranks]

        def combine(values: list) -> tuple[dict, dict]:
            (tensors, state), others = values[0], values[1:]
            for r, (rank_tensors, _) in enumerate(others, start=1):
                rng = saved_state.under_prefix("rng/", rank_tensors)
                tensors |= saved_state.with_prefix(f"rank{r}/rng/", rng)
            return tensors, {**state, "learner_workers": self.workers}

        return GroupCall(refs, combine)

    def restore(self, tensors: dict, state: dict) -> GroupCall:
        """Every rank takes the saved weights, optimizers and version, and its own saved RNG
        (a rank the checkpoint did not have takes rank 0's: every rank draws the same)."""
        shared = {k: v for k, v in tensors.items() if not k.startswith("rank")}
        refs = []
        for r, rank in enumerate(self.ranks):
            own = saved_state.under_prefix(f"rank{r}/rng/", tensors)
            mine = shared | saved_state.with_prefix("rng/", own) if own else shared
            refs.append(rank.restore.remote(mine, state))
        return GroupCall(refs)

    def export(self, out_dir: str, run_metrics: dict, step_weights: str | None = None) -> GroupCall:
        """The policy as a model directory (rank 0); `step_weights`: a step's, staged."""
        return GroupCall([self.chief.export.remote(out_dir, run_metrics, step_weights)])

    def stage(self, out_dir: str, run_metrics: dict) -> GroupCall:
        """The policy's trainable weights now, kept for `export` (rank 0)."""
        return GroupCall([self.chief.stage.remote(out_dir, run_metrics)])

    def results(self, call: GroupCall, what: str, watch: Callable[[], None] | None = None):
        """The call's result once every rank has answered (`ranks_results`)."""
        return ranks_results(call, self.names, self.timeout, what, watch)

    def dead(self) -> list[str]:
        """The names of ranks whose process is gone (a rank that does not answer in time is
        busy, not dead). Only on a failure path."""
        asked = dict(zip(self.names, self.ready(), strict=True))
        ray.wait(list(asked.values()), num_returns=len(asked), timeout=self.timeout)
        gone = []
        for name, ref in asked.items():
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError:
                gone.append(name)
            except ray.exceptions.GetTimeoutError:
                pass
        return gone

    def stop(self) -> None:
        for rank in self.ranks:
            ray.kill(rank, no_restart=True)
        if self.placement is not None:
            remove_placement_group(self.placement)
