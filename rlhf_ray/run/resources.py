"""Can the cluster ever run what the config asks for? Checked before any actor is created.

Ray would otherwise leave an unsatisfiable actor pending forever. Each role's bundle must fit
on one node, and the roles that run at the same time must fit in the cluster together.
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


def ppo_requests(res: ResourcesConfig, num_rollout_actors: int) -> list[RoleRequest]:
    """The four PPO roles, which all live at the same time."""
    return [
        RoleRequest(
            "rollout generator", num_rollout_actors, bundle(res.rollout_cpus, res.rollout_gpus)
        ),
        RoleRequest("reward scorer", 1, bundle(res.reward_cpus, res.reward_gpus)),
        RoleRequest("reference model", 1, bundle(res.reference_cpus, res.reference_gpus)),
        RoleRequest("PPO learner", res.learner_workers, bundle(res.learner_cpus, res.learner_gpus)),
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
