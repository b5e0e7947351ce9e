"""Phase 3, PPO as Ray actors. The driver holds ObjectRefs and scalar statistics only.

One iteration is five named, timed stages:
  generate   every RolloutGenerator samples its shard of prompts  -> RolloutBatch refs
  score      RewardScorer.score(every batch ref)                  -> one Scores ref   } in
  reference  ReferenceModel.logprobs(batch ref)                   -> logprobs refs    } parallel
  learn      PPOLearner.train(all refs)                           -> scalar stats
  sync       PPOLearner.weights() put once, loaded by every generator
A step samples `ppo.samples_per_prompt` responses of each of its prompts; every sample carries
its prompt's group id, so the group estimators (RLOO, GRPO) find a prompt's samples whole even
when the shards split them over generators.
With `ppo.overlap` the next batch is generated while the learner updates (one version behind).

Every `ppo.checkpoint_every` steps, and when the job is stopped (SIGTERM, as `ray job stop`
sends), the state to continue exactly goes to `<output_dir>/ppo_checkpoints/step-N/`: learner
weights, optimizers and RNG, every generator's RNG, the prompt order, the running metrics and
the batch already generated for the next step. Rerunning the same command resumes from the
newest complete checkpoint and gives the same steps as a run that was never stopped.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from jobs.dashboard_metrics import DashboardGauges
from jobs.pending import Pending, Shard, batch_fields, batch_info, batch_tensors
from jobs.roles import Roles, create_roles
from jobs.scaling import GeneratorScaler, start_control
from jobs.waiting import capacity_watch, get_results, wait_ready
from rlhf_ray.config import Config
from rlhf_ray.data.prepare import PreparedRun, read_rows
from rlhf_ray.errors import RoleFailed, RunStopped, UserInputError
from rlhf_ray.ppo.messages import RolloutBatch
from rlhf_ray.ppo.progress import Progress, PromptStream
from rlhf_ray.ppo.scaling import split_rows
from rlhf_ray.run import metrics, saved_state
from rlhf_ray.run import ppo_checkpoints as ckpt
from rlhf_ray.run.busy import busy_since
from rlhf_ray.run.checkpoints import phase_dir
from rlhf_ray.run.console import StepDisplay
from rlhf_ray.run.ledger import RolloutLedger
from rlhf_ray.run.trackers import MetricWriter, tracking_of


def stopped_after(step: int, checkpoint: Path) -> RunStopped:
    return RunStopped(
        f"PPO stopped after step {step}; its state is in {checkpoint}. "
        "Run the same command again to continue from there."
    )


class LearnerDied(RoleFailed):
    """The learner's process is gone; `run_ppo` rebuilds the roles from the newest checkpoint."""


def run_ppo(cfg: Config, prepared: PreparedRun) -> None:
    out = Path(cfg.run.output_dir).resolve()
    root = ckpt.checkpoints_root(out)
    removed = ckpt.remove_incomplete(root)
    if removed:
        print(f"[ppo] removed incomplete checkpoints a stopped run left: {', '.join(removed)}")
    prompts = [r["prompt"] for r in read_rows(prepared.data_dir, "prompts")]
    control = start_control(cfg, out)
    print(
        f"[ppo] scale the rollout generators while this runs: rlhf-ray scale --rollout N "
        f"--address {ray.get_runtime_context().gcs_address} --output_dir {out}",
        flush=True,
    )
    try:
        with stop_on_sigterm() as stop:
            for rebuild in range(cfg.ppo.max_learner_restarts + 1):
                try:
                    return train_from_newest_checkpoint(cfg, out, prompts, control, stop)
                except LearnerDied as died:
                    if rebuild == cfg.ppo.max_learner_restarts:
                        raise
                    since = ckpt.newest_complete(root)
                    print(
                        f"[ppo] {died}\n[ppo] rebuilding every role from "
                        f"{since or 'the start of PPO'} ({rebuild + 1} of "
                        f"ppo.max_learner_restarts={cfg.ppo.max_learner_restarts})",
                        flush=True,
                    )
    finally:
        ray.kill(control, no_restart=True)


def train_from_newest_checkpoint(cfg: Config, out: Path, prompts: list[str], control, stop):
    """New roles, restored from the newest complete checkpoint if any; PPO to the last step,
    then the policy exported. Every role is stopped on the way out."""
    resume_from = ckpt.newest_complete(ckpt.checkpoints_root(out))
    roles = create_roles(cfg, out)
    loop = PPOLoop(cfg, roles, PromptStream(prompts, cfg.run.seed), out, control)
    try:
        if resume_from is not None:
            loop.restore(resume_from)
        totals = loop.run(stop)
        loop.learner_call(
            roles.learner.export.remote(str(phase_dir(out, "ppo")), totals),
            "exporting the policy",
        )
    finally:
        for actor in roles.all():
            ray.kill(actor, no_restart=True)
        loop.scaler.release_retired()


@dataclass
class StopRequest:
    requested: bool = False


@contextmanager
def stop_on_sigterm() -> Iterator[StopRequest]:
    """SIGTERM (`ray job stop`, a preempted node) asks the loop to checkpoint and stop after the
    step in progress, instead of killing the driver mid-step."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be set from the main thread
        return

    def request(signum, frame) -> None:
        print("[ppo] SIGTERM: checkpointing after the step in progress, then stopping", flush=True)
        stop.requested = True

    previous = signal.signal(signal.SIGTERM, request)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


class PPOLoop:
    def __init__(
        self,
        cfg: Config,
        roles: Roles,
        prompts: PromptStream,
        out: Path,
        control: ray.actor.ActorHandle | None = None,
    ) -> None:
        """`control`: the run's RunControl, whose target generator count is applied between
        steps; without one the generators stay as created."""
        self.cfg, self.ppo = cfg, cfg.ppo
        self.roles, self.prompts = roles, prompts
        self.scaler = GeneratorScaler(cfg, roles, control)
        self.timeout = cfg.run.ray_timeout_s
        self.checkpoints = ckpt.checkpoints_root(out)
        self.ledger = RolloutLedger(out)
        self.progress = Progress()
        self.pending: Pending | None = None  # a restored batch for the next step

    def run(self, stop: StopRequest) -> dict:
        done = self.progress.step
        if done >= self.ppo.steps:
            print(f"[ppo] all {self.ppo.steps} steps were done before this run; nothing to train")
            return self.progress.totals(self.ppo.steps)
        # Steps after `done` that an earlier process logged are hidden: each step shows once.
        writer = MetricWriter(tracking_of(self.cfg), "ppo", purge_step=done + 1)
        dashboard = DashboardGauges(Path(self.cfg.run.output_dir).resolve().name)
        bar = StepDisplay("ppo", self.ppo.steps, done, self.cfg.run.progress_bar)
        self.ledger.keep_through(done)  # later steps are trained again
        clocks = self.busy_clocks()
        pending, start = self.pending or self._dispatch(), time.perf_counter()
        for step in range(done + 1, self.ppo.steps + 1):
            step_start, trained = time.perf_counter(), pending
            pending, last, times = self._step(pending, more=step < self.ppo.steps)
            per_generator = trained.generator_stats()
            self.ledger.record(step, trained.prompt_ids, per_generator)
            last[metrics.GENERATORS] = len(per_generator)
            for name, got in per_generator.items():
                for stat in metrics.GENERATOR_STATS:
                    last[metrics.generator_stat(name, stat)] = got[stat]
            self.scaler.report(step)
            self.progress.add(last.pop(metrics.BATCH_TOKENS), times, last, step)
            last[metrics.TOKENS_PER_S] = self.progress.tokens_per_s(time.perf_counter() - start)
            step_values = {**last, **{metrics.stage_time(s): t for s, t in times.items()}}
            writer.scalars(step_values, step)
            dashboard.record(step_values, step)
            bar.update(
                step,
                score=f"{last[metrics.SCORES]:.2f}",
                kl=f"{last[metrics.KL]:.2f}",
                step_s=f"{time.perf_counter() - step_start:.1f}",
            )
            every = self.ppo.checkpoint_every
            if stop.requested or (every and step % every == 0):
                start, clocks = self._end_segment(start, clocks, writer, step)
                path = self.save_checkpoint(step, pending)
                if stop.requested:
                    writer.close()
                    raise stopped_after(step, path)
        bar.close()
        self._end_segment(start, clocks, writer, self.ppo.steps)
        writer.close()
        return self.progress.totals(self.ppo.steps)

    def busy_clocks(self) -> dict[str, float]:
        """role name -> seconds its process has worked since it started; a role that is gone
        (a generator lost with its node, found at the next step) is left out."""
        roles = zip(self.roles.names(), self.roles.all(), strict=True)
        asked = {name: actor.busy_seconds.remote() for name, actor in roles}
        self._wait(list(asked.values()), "reading busy times")
        return {name: ray.get(ref) for name, ref in asked.items() if not _failed(ref)}

    def _end_segment(self, start: float, clocks: dict, writer, step: int) -> tuple[float, dict]:
        """Wall and busy seconds since `start`/`clocks` into the progress, busy shares logged;
        -> the marks for the next stretch of steps."""
        now = self.busy_clocks()
        self.progress.add_segment(time.perf_counter() - start, busy_since(clocks, now))
        shares = self.progress.busy_fractions()
        writer.scalars({metrics.role_busy(role): share for role, share in shares.items()}, step)
        return time.perf_counter(), now

    def save_checkpoint(self, step: int, pending: Pending | None) -> Path:
        """Everything `restore` needs to continue after `step` exactly as if never stopped."""
        started = time.perf_counter()
        # The next step's batch is finished and saved, so a resume neither loses nor redoes it;
        # each generator's RNG is read after that batch (actor calls run in order).
        receipts = self._wait_sampled(pending) if pending else []
        batches = self._get(pending.refs, "generating") if pending else []
        if pending:
            pending.ready_at = time.perf_counter()
        learner_tensors, learner_state = self.learner_call(
            self.roles.learner.checkpoint_state.remote(), "the learner's state"
        )
        rngs = self._on_generators("rng_state", (), "generator RNG states")
        tensors = saved_state.with_prefix("learner/", learner_tensors)
        for rank, rng in rngs.items():
            tensors |= saved_state.with_prefix(f"generator{rank}/rng/", rng)
        for i, batch in enumerate(batches):
            tensors |= saved_state.with_prefix(f"pending{i}/", batch_tensors(batch))
        state = {
            "step": step,
            "learner": learner_state,
            "prompts": self.prompts.state(),
            "progress": dataclasses.asdict(self.progress),
            "pending": [batch_info(b) for b in batches],
            "pending_receipts": receipts,
            "pending_prompt_ids": pending.prompt_ids if pending else [],
            "generator_ranks": list(rngs),
            "rollouts_per_step": self.ppo.rollouts_per_step,
        }
        path = ckpt.write_checkpoint(
            self.checkpoints, step, tensors, state, self.ppo.keep_checkpoints
        )
        size_mb = (path / ckpt.TENSORS_FILE).stat().st_size / 2**20
        print(
            f"[ppo] checkpoint {path.name}: {size_mb:.1f} MiB in "
            f"{time.perf_counter() - started:.2f}s",
            flush=True,
        )
        return path

    def restore(self, path: Path) -> None:
        """Learner, generators, prompt order, metrics and the next batch from a checkpoint."""
        tensors, state = ckpt.read_checkpoint(path)
        if state["rollouts_per_step"] != self.ppo.rollouts_per_step:
            raise UserInputError(
                f"ppo.rollouts_per_step={self.ppo.rollouts_per_step}, but the checkpoint in {path} "
                f"was taken with {state['rollouts_per_step']}: resume with the same setting or "
                "use a new run.output_dir"
            )
        learner = self.roles.learner
        learner_tensors = saved_state.under_prefix("learner/", tensors)
        self.learner_call(learner.restore.remote(learner_tensors, state["learner"]), "restoring")
        # The generators the run had when it stopped, so the resumed run samples as it would
        # have; `rlhf-ray scale` or the config's count applies from the next step on.
        self.scaler.use_ranks(state["generator_ranks"], self._get)
        gens = self.roles.generators
        self._on_generators("load_weights", (learner.weights.remote(),), "loading weights")
        self._get(
            [
                g.set_rng_state.remote(saved_state.under_prefix(f"generator{rank}/rng/", tensors))
                for rank, g in gens.items()
            ],
            "restoring generator RNG states",
        )
        self.prompts.restore(state["prompts"])
        self.progress = Progress(**state["progress"])
        if state["pending"]:
            batches = [
                RolloutBatch(**batch_fields(tensors, i, info))
                for i, info in enumerate(state["pending"])
            ]
            shards = [Shard(b.generator_rank, b.prompts, b.group.tolist()) for b in batches]
            now = time.perf_counter()  # generated before the stop; not timed again here
            self.pending = Pending(
                shards,
                [ray.put(b) for b in batches],
                [ray.put(r) for r in state["pending_receipts"]],
                state["pending_prompt_ids"],
                dispatched_at=now,
                ready_at=now,
            )
        print(f"[ppo] resuming after step {state['step']} from {path}", flush=True)

    def _dispatch(self) -> Pending:
        """Start generation of the next batch: samples_per_prompt rows per prompt, tagged with
        the prompt's group id, split as evenly as can be over the generators alive after the
        control's target is applied (a group may be split). No generator is sampling now."""
        self.scaler.rescale(self._get)
        k, gens = self.ppo.samples_per_prompt, self.roles.generators
        prompt_ids = self.prompts.take(self.ppo.prompts_per_step)
        rows = [self.prompts.prompts[i] for i in prompt_ids for _ in range(k)]
        group = [i for i in range(len(prompt_ids)) for _ in range(k)]
        shards = [
            Shard(rank, rows[start:end], group[start:end])
            for rank, (start, end) in zip(gens, split_rows(len(rows), len(gens)), strict=True)
            if end > start  # more generators than rows: the last ones sit this step out
        ]
        pending = Pending(shards, [], [], prompt_ids, time.perf_counter())
        for i in range(len(shards)):
            self._sample(pending, i)
        return pending

    def _sample(self, pending: Pending, i: int) -> None:
        """Ask shard i's generator for its rows (again, after a lost generator)."""
        shard = pending.shards[i]
        batch, receipt = self.roles.generators[shard.rank].generate.remote(
            shard.prompts, shard.group
        )
        if i < len(pending.refs):
            pending.refs[i], pending.receipts[i] = batch, receipt
        else:
            pending.refs.append(batch)
            pending.receipts.append(receipt)

    def _on_generators(self, method: str, args: tuple, what: str) -> dict:
        """rank -> result of `method(*args)` on every generator. With auto scaling one that died
        (its node left) is dropped instead: the next step is split over the others."""
        asked = {
            rank: getattr(g, method).remote(*args) for rank, g in self.roles.generators.items()
        }
        if self.ppo.autoscales:
            self._wait(list(asked.values()), what)
            lost = [rank for rank, ref in asked.items() if _failed(ref)]
            if lost:
                self.scaler.drop(lost)
            asked = {rank: ref for rank, ref in asked.items() if rank not in lost}
        return dict(zip(asked, self._get(list(asked.values()), what), strict=True))

    def _wait_sampled(self, pending: Pending) -> list[dict]:
        """Every shard's receipt, once sampled. With ppo.rollout_scaling auto a generator that
        died (its node left) is dropped and its rows go to a live one, so none is lost."""
        while True:
            self._wait(pending.receipts, "generate")
            lost = []
            if self.ppo.autoscales:
                lost = [i for i, ref in enumerate(pending.receipts) if _failed(ref)]
            if not lost:
                return self._get(pending.receipts, "PPO stage 'generate' (a rollout generator)")
            ranks = [pending.shards[i].rank for i in lost]
            live = self.scaler.replace_lost(ranks, self._get)
            for n, i in enumerate(lost):
                pending.shards[i].rank = live[n % len(live)]
                self._sample(pending, i)

    def _step(self, pending: Pending, more: bool) -> tuple[Pending | None, dict, dict]:
        """One PPO iteration on `pending`; returns the next batch in flight (None after the
        last step), stats, stage times."""
        batch_refs = pending.refs
        receipts = self._wait_sampled(pending)
        ready_at = pending.ready_at or time.perf_counter()  # not counting a checkpoint's wait
        times = {"generate": ready_at - pending.dispatched_at}
        pending.sampled = receipts
        if self.ppo.overlap and more:
            pending = self._dispatch()
        t = time.perf_counter()  # scoring and reference run in parallel: both timed from here
        scores_ref = self.roles.scorer.score.remote(*batch_refs)  # the whole step at once
        ref_refs = [self.roles.reference.logprobs.remote(b) for b in batch_refs]
        times["score"] = self._wait([scores_ref], "score", t)
        times["reference"] = self._wait(ref_refs, "reference", t)
        t = time.perf_counter()
        stats = self.learner_call(
            self.roles.learner.train.remote(
                list(zip(batch_refs, ref_refs, strict=True)), [scores_ref]
            ),
            "the learner update",
        )
        times["learn"] = time.perf_counter() - t
        t = time.perf_counter()
        weights = self.roles.learner.weights.remote()  # put once, read by every generator
        self._on_generators("load_weights", (weights,), "loading new weights into the generators")
        times["sync"] = time.perf_counter() - t
        synced = object_bytes(weights, self.timeout)
        if synced is not None:
            stats[metrics.SYNC_BYTES] = synced
        self.scaler.release_retired()  # their last batch has trained
        if not self.ppo.overlap and more:
            pending = self._dispatch()
        return (pending if more else None), stats, times

    def _watch(self) -> None:
        """While waiting: can the live nodes still hold every role, with today's generators?"""
        ppo = self.ppo  # with auto scaling, lost generators are replaced: the minimum must fit
        needed = ppo.min_rollout_actors if ppo.autoscales else len(self.roles.generators)
        capacity_watch(self.cfg, needed)()

    def learner_call(self, ref, what: str):
        """The result of a call on the learner; if its process died, LearnerDied."""
        return self._get(ref, what, died=LearnerDied)

    def _wait(self, refs: list, stage: str, since: float | None = None) -> float:
        """Seconds from `since` (default: now) until every ref is ready; nothing is fetched."""
        since = time.perf_counter() if since is None else since
        wait_ready(refs, self.timeout, f"PPO stage '{stage}'", self._watch)
        return time.perf_counter() - since

    def _get(self, refs, what: str, died: type[RoleFailed] = RoleFailed):
        """`_get` for this loop; a call that failed because the learner died (as loading its
        weights into the generators does when it dies first) is a LearnerDied, which
        `run_ppo` recovers from."""
        try:
            return get_results(refs, self.timeout, what, died, self._watch)
        except RoleFailed as err:
            if isinstance(err, LearnerDied) or not self._learner_is_dead():
                raise
            raise LearnerDied(f"{what}: the learner died: {err}") from None

    def _learner_is_dead(self) -> bool:
        """Only on a failure path; a learner that does not answer in time is busy, not dead."""
        try:
            ray.get(self.roles.learner.ready.remote(), timeout=self.timeout)
        except RayActorError:
            return True
        except GetTimeoutError:
            return False
        return False


def object_bytes(ref, timeout_s: float) -> int | None:
    """The size of `ref`'s object in the object store: the bytes each generator fetched (None
    if Ray does not know it)."""
    found = ray.experimental.get_object_locations([ref], timeout_ms=int(timeout_s * 1000))
    return found.get(ref, {}).get("object_size")


def _failed(ref) -> bool:
    """Whether a finished call's result is an actor's death (it is fetched: refs passed here
    hold a few numbers, as receipts and busy times do)."""
    try:
        ray.get(ref)
    except RayActorError:
        return True
    return False
