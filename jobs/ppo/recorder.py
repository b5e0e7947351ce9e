"""What the driver does with a finished PPO step, beside training: the rollout ledger, the
per-generator figures, the running totals and tokens per second, the trackers, the dashboard's
gauges and the console's bar; and, at each checkpoint and the end, the busy share of each role
over the stretch of steps since the last one."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from jobs.ppo.dashboard import DashboardGauges
from jobs.ppo.pending import Pending
from rlhf_ray.config import Config
from rlhf_ray.ppo.run_state import RunTotals
from rlhf_ray.run import metrics
from rlhf_ray.run.busy import busy_since
from rlhf_ray.run.console import StepDisplay
from rlhf_ray.run.ledger import RolloutLedger
from rlhf_ray.run.trackers import MetricWriter, tracking_of


class StepRecorder:
    def __init__(
        self,
        cfg: Config,
        totals: RunTotals,
        ledger: RolloutLedger,
        busy_clocks: Callable[[], dict[str, float]],
    ) -> None:
        """`totals`: carried over from the steps done before (a resumed run's); `busy_clocks`:
        role name -> seconds its process has worked since it started."""
        done = totals.step
        self.totals, self.ledger, self.busy_clocks = totals, ledger, busy_clocks
        # Steps after `done` that an earlier process logged are hidden: each step shows once.
        self.writer = MetricWriter(tracking_of(cfg), "ppo", purge_step=done + 1)
        self.dashboard = DashboardGauges(Path(cfg.run.output_dir).resolve().name)
        self.bar = StepDisplay("ppo", cfg.ppo.steps, done, cfg.run.progress_bar)
        self.ledger.keep_through(done)  # later steps are trained again
        self.segment_start, self.clocks = time.perf_counter(), busy_clocks()
        self.step_start = self.segment_start

    def step_done(self, step: int, trained: Pending, stats: dict, times: dict) -> None:
        """`trained`: the batch the step trained on; `stats`: the learner's; `times`: seconds
        per stage."""
        per_generator = trained.generator_stats()
        self.ledger.record(step, trained.prompt_ids, per_generator)
        stats[metrics.GENERATORS] = len(per_generator)
        for name, got in per_generator.items():
            for stat in metrics.GENERATOR_STATS:
                stats[metrics.generator_stat(name, stat)] = got[stat]
        self.totals.add(stats.pop(metrics.BATCH_TOKENS), times, stats, step)
        now = time.perf_counter()
        stats[metrics.TOKENS_PER_S] = self.totals.tokens_per_s(now - self.segment_start)
        values = {**stats, **{metrics.stage_time(s): t for s, t in times.items()}}
        self.writer.scalars(values, step)
        self.dashboard.record(values, step)
        self.bar.update(
            step,
            score=f"{stats[metrics.SCORES]:.2f}",
            kl=f"{stats[metrics.KL]:.2f}",
            step_s=f"{now - self.step_start:.1f}",
        )
        self.step_start = now

    def checkpointed(self, step: int, save: Callable[[], Path]) -> Path:
        """The stretch of steps ends with a checkpoint written by `save`; -> its path."""
        self.end_segment(step)
        path = save()
        self.step_start = time.perf_counter()  # the checkpoint's time is no step's
        return path

    def end_segment(self, step: int) -> None:
        """A stretch of steps ended (a checkpoint, the end): its wall time and each role's busy
        seconds into the totals, the busy shares logged."""
        now = self.busy_clocks()
        self.totals.add_segment(
            time.perf_counter() - self.segment_start, busy_since(self.clocks, now)
        )
        shares = self.totals.busy_fractions()
        self.writer.scalars({metrics.role_busy(role): s for role, s in shares.items()}, step)
        self.segment_start, self.clocks = time.perf_counter(), now

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
