"""The batches the PPO driver has asked the rollout generators for and not yet trained on,
oldest first: asking for them (split over the generators), waiting for them (asking again for a
lost generator's rows), and, with `ppo.overlap`, keeping the generators ahead of the learner and
choosing the batch a step trains on (`ppo.max_policy_lag`, `ppo.stale_batches`: the rules are in
rlhf_ray/ppo/staleness.py)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import ray
from ray.exceptions import RayActorError

from jobs.ppo.pending import Pending, Shard
from jobs.ppo.roles import Roles
from jobs.ppo.scaling import GeneratorScaler
from rlhf_ray.config import Config
from rlhf_ray.ppo import staleness
from rlhf_ray.ppo.run_state import PromptStream
from rlhf_ray.ppo.scaling import split_rows

POLL_S = 0.05  # how often the driver looks for a finished batch while the learner updates


class RolloutQueue:
    def __init__(
        self,
        cfg: Config,
        roles: Roles,
        prompts: PromptStream,
        scaler: GeneratorScaler,
        wait: Callable[[list, str], float],
        get: Callable,
    ) -> None:
        """`wait(refs, stage)` blocks until refs are ready, `get(refs, what)` fetches them: the
        loop's, which name the stage and watch the cluster."""
        self.ppo, self.roles, self.prompts, self.scaler = cfg.ppo, roles, prompts, scaler
        self.wait, self.get = wait, get
        self.batches: deque[Pending] = deque()
        self.asked = 0  # batches asked for by this process: each Pending's serial
        self.last_ready = 0.0  # when the last batch taken off the queue was seen sampled

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def restore(self, batches: list[Pending]) -> None:
        self.batches = deque(batches)

    def dispatch(self) -> Pending:
        """Ask for the next batch, queued behind those asked for before: samples_per_prompt rows
        per prompt, tagged with the prompt's group id, split as evenly as can be over the
        generators alive after the control's target is applied (a group may be split)."""
        self.scaler.rescale(self.get, self.asked)
        k, gens = self.ppo.samples_per_prompt, self.roles.generators
        prompt_ids = self.prompts.take(self.ppo.prompts_per_step)
        rows = [self.prompts.prompts[i] for i in prompt_ids for _ in range(k)]
        group = [i for i in range(len(prompt_ids)) for _ in range(k)]
        shards = [
            Shard(rank, rows[start:end], group[start:end])
            for rank, (start, end) in zip(gens, split_rows(len(rows), len(gens)), strict=True)
            if end > start  # more generators than rows: the last ones sit this step out
        ]
        pending = Pending(shards, [], [], prompt_ids, time.perf_counter(), serial=self.asked)
        self.asked += 1
        for i in range(len(shards)):
            self._sample(pending, i)
        self.batches.append(pending)
        return pending

    def oldest_serial(self) -> int:
        """The serial of the oldest batch waiting (the next one's when none is): a generator
        retired before it has no batch left to sample."""
        return self.batches[0].serial if self.batches else self.asked

    def _sample(self, pending: Pending, i: int) -> None:
        """Ask shard i's generator for its rows (again, after a lost generator)."""
        shard = pending.shards[i]
        shard.asked += 1
        batch, receipt = self.roles.generators[shard.rank].generate.remote(
            shard.prompts, shard.group
        )
        if i < len(pending.refs):
            pending.refs[i], pending.receipts[i] = batch, receipt
        else:
            pending.refs.append(batch)
            pending.receipts.append(receipt)

    def wait_sampled(self, pending: Pending) -> list[dict]:
        """Every shard's receipt, once sampled. A shard whose generator died while sampling is
        asked again (Ray never re-runs `generate`): with ppo.rollout_scaling auto of a live
        generator (the dead one is dropped: its node left), else of the same one, restarted by
        Ray, up to ppo.max_role_restarts times; no row is lost or sampled twice."""
        while pending.sampled is None:
            self.wait(pending.receipts, "generate")
            lost = [i for i, ref in enumerate(pending.receipts) if failed(ref)]
            if not self.ppo.autoscales and any(
                pending.shards[i].asked > self.ppo.max_role_restarts for i in lost
            ):
                lost = []  # restarts used up: the error below names the generator
            if not lost:
                what = "PPO stage 'generate' (a rollout generator)"
                pending.sampled = self.get(pending.receipts, what)
                pending.ready_at = pending.ready_at or time.perf_counter()
                break
            if self.ppo.autoscales:
                ranks = [pending.shards[i].rank for i in lost]
                live = self.scaler.replace_lost(ranks, self.get, self.asked)
                for n, i in enumerate(lost):
                    pending.shards[i].rank = live[n % len(live)]
            for i in lost:
                self._sample(pending, i)
        return pending.sampled

    def wait_all(self) -> None:
        """Wait until every batch asked for is sampled (a checkpoint saves them; the weights a
        sync loads are queued behind them on the generators)."""
        for pending in self.batches:
            self.wait_sampled(pending)

    def _sampled_now(self, pending: Pending) -> bool:
        if pending.sampled is None:
            ready, _ = ray.wait(pending.receipts, num_returns=len(pending.receipts), timeout=0)
            if len(ready) == len(pending.receipts):
                self.wait_sampled(pending)  # fetched, or a lost shard asked again
        return pending.sampled is not None

    def take(self, learner_version: int) -> tuple[Pending, int]:
        """The batch a step trains on, out of the queue, and the rows dropped as stale. Its
        `started_at`: when it was asked for, or when the batch before it on the generators was
        sampled (their calls run in order), so its time in the queue is not sampling time."""
        dropped = 0
        while True:
            versions = [p.version() if self._sampled_now(p) else None for p in self.batches]
            choice = staleness.choose(
                versions, learner_version, self.ppo.max_policy_lag, self.ppo.stale_batches
            )
            for i in reversed(choice.drop):
                dropped += self.batches[i].rows()
                self.last_ready = max(self.last_ready, self.batches[i].ready_at)
                del self.batches[i]
            if choice.train is not None:
                train = choice.train - sum(1 for i in choice.drop if i < choice.train)
                pending = self.batches[train]
                del self.batches[train]
                started = max(pending.dispatched_at, self.last_ready)
                pending.started_at = min(started, pending.ready_at)  # seen out of order: 0 s
                self.last_ready = pending.ready_at
                return pending, dropped
            if not self.batches:
                self.dispatch()  # every batch was too old: a fresh one
            self.wait_sampled(self.batches[0])

    def fill(self, steps_left: int) -> None:
        """With overlap: ask for as many batches as the pipeline runs ahead of the learner."""
        if not self.ppo.overlap:
            return
        sampling = sum(1 for p in self.batches if not self._sampled_now(p))
        ahead = staleness.batches_ahead(
            self.ppo.stale_batches, self.ppo.max_policy_lag, steps_left, len(self), sampling
        )
        for _ in range(ahead):
            self.dispatch()

    def fill_until(self, refs: list, steps_left: int, timeout_s: float) -> None:
        """Keep the pipeline filled (`fill`) until every ref is ready or `timeout_s` passed:
        with stale_batches drop the generators are asked for another batch whenever they
        finish one while the learner updates. The refs are the caller's to fetch (and to time
        out on)."""
        if not (self.ppo.overlap and self.ppo.stale_batches == "drop" and steps_left):
            return
        deadline = time.monotonic() + timeout_s
        while ray.wait(refs, num_returns=len(refs), timeout=POLL_S)[1]:
            if time.monotonic() > deadline:
                return
            self.fill(steps_left)


def failed(ref) -> bool:
    """Whether a finished call's result is an actor's death (it is fetched: refs passed here
    hold a few numbers, as receipts and busy times do)."""
    try:
        ray.get(ref)
    except RayActorError:
        return True
    return False
