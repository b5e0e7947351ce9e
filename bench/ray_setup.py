"""The Ray a benchmark's rlhf-ray run joins: a local Ray of 2 CPUs, or `nodes` simulated nodes
sharing those 2 CPUs (ray.cluster_utils.Cluster: each node has its own object store, so
batches cross between nodes as on a cluster)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


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
