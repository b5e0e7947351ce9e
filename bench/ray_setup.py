"""The Ray a benchmark's rlhf-ray run joins: a local Ray of 2 CPUs, or `nodes` simulated nodes
sharing those 2 CPUs (ray.cluster_utils.Cluster: each node has its own object store, so
batches cross between nodes as on a cluster); and the PPO steps a benchmark times on it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@contextmanager
def bench_ray(nodes: int) -> Iterator[None]:
    import ray
    from ray.cluster_utils import Cluster

    cluster = None
    if nodes > 1:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(nodes):
            cluster.add_node(num_cpus=2 / nodes)
        ray.init(address=cluster.address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


@dataclass
class TimedSteps:
    seconds: list[float]  # each step's wall time, the first (with its warm-up) included
    stages: list[dict[str, float]]  # each step's stage seconds (generate, score, ..., learn)
    busy: dict[str, float]  # each role's busy seconds after the first step, read in the role


def timed_ppo_steps(cfg, models: Path, nodes: int) -> TimedSteps:
    """`cfg.ppo.steps` PPO steps of the four roles on `models` (a run with SFT and reward done),
    driven here as the driver's loop drives them, on `bench_ray(nodes)`."""
    from jobs.ppo.loop import PPOLoop
    from jobs.ppo.roles import create_roles
    from rlhf_ray.data.jsonl import read_jsonl
    from rlhf_ray.ppo.run_state import PromptStream
    from rlhf_ray.run.busy import busy_since

    steps = cfg.ppo.steps
    with bench_ray(nodes):
        roles = create_roles(cfg, models)
        prompts = [row["prompt"] for row in read_jsonl(models / "data" / "prompts.jsonl")]
        loop = PPOLoop(cfg, roles, PromptStream(prompts, 0), models)
        loop.queue.dispatch()
        seconds, stages = [], []
        for step in range(1, steps + 1):
            start = time.perf_counter()
            _, _, times = loop.step(steps_left=steps - step)
            seconds.append(time.perf_counter() - start)
            stages.append(times)
            if step == 1:  # steady state from here: each role's busy clock, read inside the role
                clocks = loop.busy_clocks()
        busy = busy_since(clocks, loop.busy_clocks())
        roles.stop()
    return TimedSteps(seconds, stages, busy)
