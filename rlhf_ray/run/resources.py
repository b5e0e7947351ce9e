"""Can the cluster ever run what the config asks for? Checked before any actor is created.

Ray would otherwise leave an unsatisfiable actor pending forever. Each role's bundle must fit
on one node, and the roles that run at the same time must fit in the cluster together; on
several nodes, Ray itself is asked whether it can place them (`BundleGroup`, jobs/placement.py),
since CPUs enough in total can still be split across nodes so that no bundle fits.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_ray.config import ResourcesConfig
from rlhf_ray.errors import ResourceError


@dataclass(frozen=True)
class RoleRequest:
    role: str  # e.g. "rollout generator", named as in the error message
    count: int  # replicas running at the same time
    bundle: dict[str, float]  # Ray resources of one replica, e.g. {"CPU": 1.0, "GPU": 0.5}


@dataclass(frozen=True)
class PhaseResources:
    """What one phase asks of the cluster at one time."""

    what: str  # e.g. "the PPO phase", as the error messages name it
    requests: list[RoleRequest]  # the roles that run at the same time
    groups: list[BundleGroup]  # how Ray places them, in the order it does


def actor_options(cpus: float, gpus: float) -> dict[str, float]:
    """Ray's `.options(...)` for one replica of a role (an actor or a task)."""
    return {"num_cpus": cpus, "num_gpus": gpus}


def bundle(cpus: float, gpus: float) -> dict[str, float]:
    """The same request as a resource bundle, as Ray reports node resources."""
    out = {"CPU": cpus}
    if gpus > 0:
        out["GPU"] = gpus
    return out


def training_requests(res: ResourcesConfig) -> list[RoleRequest]:
    """SFT and reward phases: the Ray Train workers."""
    return [
        RoleRequest(
            "train worker", res.train_workers, bundle(res.train_worker_cpus, res.train_worker_gpus)
        )
    ]


LEARNER = "PPO learner"


def ppo_requests(res: ResourcesConfig, num_rollout_actors: int) -> list[RoleRequest]:
    """The four PPO roles, which all live at the same time."""
    return [
        RoleRequest(
            "rollout generator", num_rollout_actors, bundle(res.rollout_cpus, res.rollout_gpus)
        ),
        RoleRequest("reward scorer", 1, bundle(res.reward_cpus, res.reward_gpus)),
        RoleRequest("reference model", 1, bundle(res.reference_cpus, res.reference_gpus)),
        RoleRequest(LEARNER, res.learner_workers, bundle(res.learner_cpus, res.learner_gpus)),
    ]


@dataclass(frozen=True)
class BundleGroup:
    """Bundles that Ray must place together, as one placement group would: one per replica of
    each role, laid out by `strategy` (Ray's PACK or SPREAD)."""

    name: str  # as the error message names it, e.g. "the learner group"
    roles: list[RoleRequest]
    strategy: str  # Ray's placement strategy
    settings: str  # the config keys that shape the group, for the error message
    hint: str = ""  # why it may not fit where it otherwise would, appended to the error message

    def bundles(self) -> list[dict[str, float]]:
        """One bundle per replica, zero amounts left out. A replica that asks for nothing has
        no bundle: Ray refuses an empty one, and it fits on any node anyway."""
        out = []
        for role in self.roles:
            asked = {name: amount for name, amount in role.bundle.items() if amount > 0}
            out += [asked] * role.count if asked else []
        return out

    def describe(self) -> str:
        """e.g. "2 x PPO learner {CPU: 0.5}, reward scorer {CPU: 1}; strategy SPREAD"."""
        parts = [
            f"{f'{r.count} x ' if r.count > 1 else ''}{r.role} {describe_bundle(r.bundle)}"
            for r in self.roles
            if r.count > 0 and any(r.bundle.values())
        ]
        return f"{', '.join(parts)}; strategy {self.strategy}"


def describe_bundle(resources: dict[str, float]) -> str:
    """{"CPU": 1.0, "GPU": 0.5} -> "{CPU: 1, GPU: 0.5}"."""
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in resources.items()) + "}"


def training_groups(res: ResourcesConfig) -> list[BundleGroup]:
    """The SFT and reward phases' Ray Train workers, placed as Ray Train places them: one
    placement group of `resources.train_workers` bundles, PACK (ScalingConfig's default; its
    controller asks for no resources)."""
    return [
        BundleGroup(
            "the Ray Train workers",
            training_requests(res),
            "PACK",
            "resources.train_workers, train_worker_cpus, train_worker_gpus",
        )
    ]


def ppo_groups(res: ResourcesConfig, num_rollout_actors: int) -> list[BundleGroup]:
    """The PPO roles in the order Ray places them, each group held while the next is tried.

    The run creates the learner group's placement group first (jobs/ppo/learner_group.py:
    `resources.learner_workers` bundles laid out by `resources.learner_placement`), then the
    reward scorer, the reference model and the rollout generators as single actors, which
    Ray places wherever the learner group left room. So the check places the learner group with
    its own strategy and then, beside it, the other roles as one PACK group.

    Why not one PACK group of every PPO bundle: with `learner_placement: spread` Ray puts the
    ranks on different nodes first, which can leave no node room for a larger role although one
    PACK group of all the bundles would fit (two 1-CPU nodes, two 0.5-CPU ranks spread, a 1-CPU
    reward scorer): that run would wait forever, so the check must see the learner's layout.
    Why PACK for the other roles: they have no group of their own, and PACK and SPREAD are both
    best effort in Ray (only STRICT_* refuse a layout), so either asks only "can these bundles
    be placed at all, on what the learner group left"; PACK is what Ray Train uses too.
    """
    requests = ppo_requests(res, num_rollout_actors)
    learner = [r for r in requests if r.role == LEARNER]
    others = [r for r in requests if r.role != LEARNER]
    spread = res.learner_placement == "spread" and res.learner_workers > 1
    hint = (
        " (resources.learner_placement=spread put the learner ranks on different nodes first; "
        "pack may leave a node room)"
        if spread
        else ""
    )
    return [
        BundleGroup(
            "the learner group",
            learner,
            res.learner_placement.upper(),
            "resources.learner_workers, learner_cpus, learner_gpus, learner_placement",
        ),
        BundleGroup(
            "the other PPO roles",
            others,
            "PACK",
            "ppo.num_rollout_actors, resources.rollout_*, reward_*, reference_*",
            hint,
        ),
    ]


def check_fits(requests: list[RoleRequest], nodes: list[dict[str, float]], what: str) -> None:
    """Raise ResourceError naming the role and resource that can never be satisfied.

    `nodes` are the alive nodes' total resources (as in `ray.nodes()[i]["Resources"]`).
    """
    for req in requests:
        for name, amount in req.bundle.items():
            best = max((node.get(name, 0.0) for node in nodes), default=0.0)
            if amount > best:
                raise ResourceError(
                    f"{what}: the {req.role} asks for {name}={amount:g} per replica, but the "
                    f"largest node has {name}={best:g} (resources.* in the config)"
                )
    totals: dict[str, float] = {}
    for req in requests:
        for name, amount in req.bundle.items():
            totals[name] = totals.get(name, 0.0) + amount * req.count
    for name, needed in totals.items():
        have = sum(node.get(name, 0.0) for node in nodes)
        if needed > have + 1e-9:
            parts = ", ".join(
                f"{r.role} {r.count}x{r.bundle[name]:g}" for r in requests if name in r.bundle
            )
            raise ResourceError(
                f"{what}: the roles together need {name}={needed:g} ({parts}), but the "
                f"cluster has {name}={have:g}"
            )


def check_learner_threads(res: ResourcesConfig, nodes: list[dict[str, float]]) -> None:
    """Raise ResourceError when `resources.learner_threads` is more than the largest node has
    CPUs: the learner runs on one node, where threads beyond its cores only wait for each other,
    and tens of thousands fail to start at all ("can't start new thread") once PPO begins."""
    most = int(max((node.get("CPU", 0.0) for node in nodes), default=0.0))
    if res.learner_threads > most:
        raise ResourceError(
            f"resources.learner_threads={res.learner_threads}: expected at most {most}, the CPUs "
            "of the largest node in the Ray cluster (the learner's threads all run on its one "
            "node), or 0 for as many as resources.learner_cpus"
        )
