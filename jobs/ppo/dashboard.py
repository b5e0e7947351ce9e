"""PPO metrics on the Ray dashboard: `ray.util.metrics` gauges set by the driver each step.

They appear in the dashboard's Metrics view and at every node's Prometheus endpoint as
`ray_rlhf_<metric>` (names: rlhf_ray.run.metrics.DASHBOARD), tagged with the run (the output
directory's name) and, for per-generator figures, the generator (rollout-<rank>).
"""

from __future__ import annotations

from ray.util.metrics import Gauge

from rlhf_ray.run import metrics


class DashboardGauges:
    def __init__(self, run: str) -> None:
        self.run = run
        self.gauges = {
            name: Gauge(metrics.dashboard_name(name), description=name, tag_keys=("run",))
            for name in (*metrics.DASHBOARD, metrics.DASHBOARD_STEP)
        }
        self.per_generator = {
            stat: Gauge(
                metrics.dashboard_name(metrics.generator_stat("g", stat)),
                description=f"rollout/<generator>/{stat}",
                tag_keys=("run", "generator"),
            )
            for stat in metrics.GENERATOR_STATS
        }

    def record(self, values: dict[str, float], step: int) -> None:
        tags = {"run": self.run}
        self.gauges[metrics.DASHBOARD_STEP].set(step, tags=tags)
        for name, value in values.items():
            if name in self.gauges:
                self.gauges[name].set(float(value), tags=tags)
                continue
            parts = name.split("/")
            if len(parts) == 3 and parts[0] == "rollout" and parts[2] in self.per_generator:
                generator_tags = {**tags, "generator": parts[1]}
                self.per_generator[parts[2]].set(float(value), tags=generator_tags)
