"""PPOLoop: PPO's iterations, each five named, timed stages:
  generate   every RolloutGenerator samples its shard of prompts  -> RolloutBatch refs
  score      RewardScorer.score(every batch ref)                  -> one Scores ref   } in
  reference  ReferenceModel.logprobs(batch ref)                   -> logprobs refs    } parallel
  learn      PPOLearner.train(all refs)                           -> scalar stats
  sync       PPOLearner.weights() put once, loaded by every generator
A step samples `ppo.samples_per_prompt` responses of each of its prompts; every sample carries
its prompt's group id, so the group estimators (RLOO, GRPO) find a prompt's samples whole even
when the shards split them over generators.
With `ppo.overlap` the next batch is generated while the learner updates (one version behind).
Every `eval.every` steps and at the last, the held-out prompts are sampled with the policy as it
is and scored (rlhf_ray/run/best_step.py); the best step so far is exported into a staging
folder, which becomes `policy/` at the end (`export`).
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from jobs.ppo import checkpoint
from jobs.ppo.learner_group import GroupCall, LearnerDied
from jobs.ppo.pending import Pending, Shard
from jobs.ppo.recorder import StepRecorder
from jobs.ppo.roles import Roles
from jobs.ppo.scaling import GeneratorScaler
from jobs.ppo.waiting import capacity_watch, get_results, wait_ready
from rlhf_ray.config import Config
from rlhf_ray.errors import RoleFailed, RunStopped
from rlhf_ray.ppo.run_state import PromptStream, RunTotals
from rlhf_ray.ppo.scaling import split_rows
from rlhf_ray.run import metrics, saved_state
from rlhf_ray.run import ppo_checkpoints as ckpt
from rlhf_ray.run.best_step import (
    BEST_DIR,
    LAST_DIR,
    STEP_WEIGHTS,
    BestStep,
    eval_due,
    selection_judge,
    staged_dir,
    stale_staged,
)
from rlhf_ray.run.checkpoints import phase_dir
from rlhf_ray.run.ledger import RolloutLedger


@dataclass
class StopRequest:
    requested: bool = False


def stopped_after(step: int, saved: Path) -> RunStopped:
    return RunStopped(
        f"PPO stopped after step {step}; its state is in {saved}. "
        "Run the same command again to continue from there."
    )


class PPOLoop:
    def __init__(
        self,
        cfg: Config,
        roles: Roles,
        prompts: PromptStream,
        out: Path,
        control: ray.actor.ActorHandle | None = None,
        eval_prompts: list | None = None,
    ) -> None:
        """`control`: the run's RunControl, whose target generator count is applied between
        steps; without one the generators stay as created. `eval_prompts`: the held-out
        prompts evaluated every `eval.every` steps; without them nothing is evaluated."""
        self.cfg, self.ppo, self.out = cfg, cfg.ppo, out
        every = cfg.eval.every if eval_prompts else 0
        self.eval_every = every
        samples = cfg.eval.samples_during_training
        self.eval_rows = [p for p in eval_prompts or [] for _ in range(samples)]
        self.best = BestStep()
        self.roles, self.prompts = roles, prompts
        self.scaler = GeneratorScaler(cfg, roles, control)
        self.timeout = cfg.run.ray_timeout_s
        self.checkpoints = ckpt.checkpoints_root(out)
        self.ledger = RolloutLedger(out)
        self.totals = RunTotals()
        self.pending: Pending | None = None  # a restored batch for the next step

    def run(self, stop: StopRequest) -> dict:
        steps, done = self.ppo.steps, self.totals.step
        if done >= steps:
            print(f"[ppo] all {steps} steps were done before this run; nothing to train")
            return self.totals.summary(steps)
        for stale in stale_staged(self.out, self.best):  # evaluated after the checkpoint
            shutil.rmtree(stale)
        recorder = StepRecorder(self.cfg, self.totals, self.ledger, self.busy_clocks)
        pending = self.pending or self.dispatch()
        for step in range(done + 1, steps + 1):
            trained = pending
            pending, stats, times = self.step(trained, more=step < steps)
            if eval_due(step, self.eval_every, steps):
                stats |= self.evaluate(step, pending)
            recorder.step_done(step, trained, stats, times)
            self.scaler.report(step)
            if stop.requested or self._checkpoint_due(step):
                save = functools.partial(self.save_checkpoint, step, pending)
                path = recorder.checkpointed(step, save)
                if stop.requested:
                    recorder.close()
                    raise stopped_after(step, path)
        recorder.end_segment(steps)
        recorder.close()
        return self.totals.summary(steps)

    def _checkpoint_due(self, step: int) -> bool:
        every = self.ppo.checkpoint_every
        return bool(every) and step % every == 0

    def busy_clocks(self) -> dict[str, float]:
        """role name -> seconds its process has worked since it started; a role that is gone
        (a generator lost with its node, found at the next step) is left out."""
        roles = zip(self.roles.names(), self.roles.all(), strict=True)
        asked = {name: actor.busy_seconds.remote() for name, actor in roles}
        self._wait(list(asked.values()), "reading busy times")
        return {name: ray.get(ref) for name, ref in asked.items() if not _failed(ref)}

    def save_checkpoint(self, step: int, pending: Pending | None) -> Path:
        """Everything `restore` needs to continue after `step` exactly as if never stopped."""
        started = time.perf_counter()
        # The next step's batch is finished and saved, so a resume neither loses nor redoes it;
        # each generator's RNG is read after that batch (actor calls run in order).
        receipts = self.wait_sampled(pending) if pending else []
        batches = self.get(pending.refs, "generating") if pending else []
        if pending:
            pending.ready_at = pending.ready_at or time.perf_counter()
        learner_tensors, learner_state = self.learner_call(
            self.roles.learner.checkpoint_state(), "the learner's state"
        )
        rngs = self.on_generators("rng_state", (), "generator RNG states")
        state = {
            "step": step,
            "learner": learner_state,
            "prompts": self.prompts.state(),
            "progress": dataclasses.asdict(self.totals),
            "pending": [checkpoint.batch_info(b) for b in batches],
            "pending_receipts": receipts,
            "pending_prompt_ids": pending.prompt_ids if pending else [],
            "generator_ranks": list(rngs),
            "next_generator_rank": self.roles.next_rank,
            "rollouts_per_step": self.ppo.rollouts_per_step,
            "best": self.best.state(),
        }
        tensors = checkpoint.checkpoint_tensors(learner_tensors, rngs, batches)
        keep = self.ppo.keep_checkpoints
        path = ckpt.write_checkpoint(self.checkpoints, step, tensors, state, keep)
        size_mb = (path / ckpt.TENSORS_FILE).stat().st_size / 2**20
        took = time.perf_counter() - started
        print(f"[ppo] checkpoint {path.name}: {size_mb:.1f} MiB in {took:.2f}s", flush=True)
        return path

    def restore(self, path: Path) -> None:
        """Learner, generators, prompt order, totals and the next batch from a checkpoint."""
        tensors, state = ckpt.read_checkpoint(path)
        checkpoint.check_resumable(state, self.ppo.rollouts_per_step, path)
        learner = self.roles.learner
        learner_tensors = saved_state.under_prefix("learner/", tensors)
        checkpoint.say_learner_change(state["learner"], learner.workers)
        self.learner_call(learner.restore(learner_tensors, state["learner"]), "restoring")
        # The generators the run had when it stopped, so the resumed run samples as it would
        # have; `rlhf-ray scale` or the config's count applies from the next step on.
        self.scaler.use_ranks(state["generator_ranks"], self.get)
        self.roles.next_rank = state["next_generator_rank"]  # retired ranks stay retired
        self.on_generators("load_weights", (learner.weights(),), "loading weights")
        rngs = {
            rank: saved_state.under_prefix(f"generator{rank}/rng/", tensors)
            for rank in self.roles.generators
        }
        asked = [g.set_rng_state.remote(rngs[r]) for r, g in self.roles.generators.items()]
        self.get(asked, "restoring generator RNG states")
        self.prompts.restore(state["prompts"])
        self.totals = RunTotals(**state["progress"])
        self.best = BestStep.from_state(state.get("best"))
        if state["pending"]:
            self.pending = checkpoint.restored_pending(tensors, state)
        print(f"[ppo] resuming after step {state['step']} from {path}", flush=True)

    def evaluate(self, step: int, pending: Pending | None) -> dict:
        """The held-out prompts sampled by a generator (which holds this step's weights) from
        the run's seed, scored, and their KL to the reference -> eval/* metrics; a step better
        than every earlier one is exported into its staging folder (best_step.py)."""
        started = time.perf_counter()
        if pending:  # the next batch's sampling comes first on the generators: not timed here
            self.wait_sampled(pending)
            pending.ready_at = pending.ready_at or time.perf_counter()
        generator = next(iter(self.roles.generators.values()))
        batch = generator.evaluate.remote(self.eval_rows, self.cfg.run.seed)
        reference = self.roles.reference.logprobs.remote(batch)
        means = self.get(
            self.roles.scorer.evaluate.remote(batch, reference), "evaluating held-out prompts"
        )
        judge = selection_judge(means)
        stats = {metrics.eval_judge(name): means[name] for name in means if name != "kl"}
        stats.pop(metrics.eval_judge("response_length"))
        stats[metrics.EVAL_RESPONSE_LENGTH] = means["response_length"]
        stats |= {metrics.EVAL_SCORE: means[judge], metrics.EVAL_KL: means["kl"]}
        if self.best.offer(step, means[judge], means["kl"], judge):
            staged = staged_dir(self.out, step)
            info = {"step": step, "eval_judge": judge, **stats}
            self.learner_call(self.roles.learner.stage(str(staged), info), "keeping a step")
            for stale in stale_staged(self.out, self.best):  # the best before this one
                shutil.rmtree(stale)
        stats[metrics.EVAL_BEST_STEP] = self.best.step
        stats[metrics.EVAL_SECONDS] = time.perf_counter() - started
        return stats

    def export(self, totals: dict) -> None:
        """`policy/`: the best evaluated step (moved from its staging folder), or the last
        step when nothing was evaluated; `policy-last/`: the last step, a link to `policy`
        when the last step is the best."""
        final, last = phase_dir(self.out, "ppo"), self.out / LAST_DIR
        learner = self.roles.learner
        best, steps = self.best, totals["steps"]
        if last.is_symlink() or last.is_file():
            last.unlink()
        elif last.exists():  # a run that stopped between the two exports: written again
            shutil.rmtree(last)
        if best.step is None:
            self.learner_call(learner.export(str(final), totals), "exporting the policy")
            return
        # the last step's eval/* figures are not the best step's: only its own are kept
        run_metrics = {k: v for k, v in totals.items() if not k.startswith("eval/")}
        run_metrics |= _best_info(best)
        if best.step == steps:
            self.learner_call(learner.export(str(final), run_metrics), "exporting the policy")
            last.symlink_to(final.name)
        else:
            self.learner_call(learner.export(str(last), totals), "exporting the last step")
            weights = str(staged_dir(self.out, best.step) / STEP_WEIGHTS)
            self.learner_call(learner.export(str(final), run_metrics, weights), "exporting")
        shutil.rmtree(self.out / BEST_DIR, ignore_errors=True)
        print(
            f"[ppo] policy/ is step {best.step} of {steps} (eval/score {best.score:.4f}, the "
            f"best of the evaluated steps); policy-last/ is step {steps}"
            + (" (the same: a link)" if best.step == steps else ""),
            flush=True,
        )

    def dispatch(self) -> Pending:
        """Start generation of the next batch: samples_per_prompt rows per prompt, tagged with
        the prompt's group id, split as evenly as can be over the generators alive after the
        control's target is applied (a group may be split). No generator is sampling now."""
        self.scaler.rescale(self.get)
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
        shard.asked += 1
        batch, receipt = self.roles.generators[shard.rank].generate.remote(
            shard.prompts, shard.group
        )
        if i < len(pending.refs):
            pending.refs[i], pending.receipts[i] = batch, receipt
        else:
            pending.refs.append(batch)
            pending.receipts.append(receipt)

    def on_generators(self, method: str, args: tuple, what: str) -> dict:
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
        return dict(zip(asked, self.get(list(asked.values()), what), strict=True))

    def wait_sampled(self, pending: Pending) -> list[dict]:
        """Every shard's receipt, once sampled. A shard whose generator died while sampling is
        asked again (Ray never re-runs `generate`): with ppo.rollout_scaling auto of a live
        generator (the dead one is dropped: its node left), else of the same one, restarted by
        Ray, up to ppo.max_role_restarts times; no row is lost or sampled twice."""
        while True:
            self._wait(pending.receipts, "generate")
            lost = [i for i, ref in enumerate(pending.receipts) if _failed(ref)]
            if not self.ppo.autoscales and any(
                pending.shards[i].asked > self.ppo.max_role_restarts for i in lost
            ):
                lost = []  # restarts used up: the error below names the generator
            if not lost:
                return self.get(pending.receipts, "PPO stage 'generate' (a rollout generator)")
            if self.ppo.autoscales:
                ranks = [pending.shards[i].rank for i in lost]
                live = self.scaler.replace_lost(ranks, self.get)
                for n, i in enumerate(lost):
                    pending.shards[i].rank = live[n % len(live)]
            for i in lost:
                self._sample(pending, i)

    def step(self, pending: Pending, more: bool) -> tuple[Pending | None, dict, dict]:
        """One PPO iteration on `pending`; returns the next batch in flight (None after the
        last step), stats, stage times."""
        batch_refs = pending.refs
        receipts = self.wait_sampled(pending)
        ready_at = pending.ready_at or time.perf_counter()  # not counting later waits
        times = {"generate": ready_at - pending.dispatched_at}
        pending.sampled = receipts
        if self.ppo.overlap and more:
            pending = self.dispatch()
        t = time.perf_counter()  # scoring and reference run in parallel: both timed from here
        scores_ref = self.roles.scorer.score.remote(*batch_refs)  # the whole step at once
        ref_refs = [self.roles.reference.logprobs.remote(b) for b in batch_refs]
        times["score"] = self._wait([scores_ref], "score", t)
        times["reference"] = self._wait(ref_refs, "reference", t)
        t = time.perf_counter()
        stats = self.learner_call(
            self.roles.learner.train(list(zip(batch_refs, ref_refs, strict=True)), [scores_ref]),
            "the learner update",
        )
        times["learn"] = time.perf_counter() - t
        if self.ppo.overlap and more:
            # The generators load new weights after the next batch (calls run in order): wait
            # for that batch here, so its sampling is not counted as the sync's time.
            self.wait_sampled(pending)
            pending.ready_at = pending.ready_at or time.perf_counter()
        t = time.perf_counter()
        weights = self.roles.learner.weights()  # put once, read by every generator
        self.on_generators("load_weights", (weights,), "loading new weights into the generators")
        times["sync"] = time.perf_counter() - t
        synced = object_bytes(weights, self.timeout)
        if synced is not None:
            stats[metrics.SYNC_BYTES] = synced
        self.scaler.release_retired()  # their last batch has trained
        if not self.ppo.overlap and more:
            pending = self.dispatch()
        return (pending if more else None), stats, times

    def _watch(self) -> None:
        """While waiting: can the live nodes still hold every role, with today's generators?"""
        ppo = self.ppo  # with auto scaling, lost generators are replaced: the minimum must fit
        needed = ppo.min_rollout_actors if ppo.autoscales else len(self.roles.generators)
        capacity_watch(self.cfg, needed)()

    def learner_call(self, call: GroupCall, what: str):
        """The result of a call on the learner's ranks; if a rank's process died, LearnerDied."""
        return self.roles.learner.results(call, what, self._watch)

    def _wait(self, refs: list, stage: str, since: float | None = None) -> float:
        """Seconds from `since` (default: now) until every ref is ready; nothing is fetched."""
        since = time.perf_counter() if since is None else since
        wait_ready(refs, self.timeout, f"PPO stage '{stage}'", self._watch)
        return time.perf_counter() - since

    def get(self, refs, what: str):
        """`get_results` for this loop; a call that failed because the learner died (as loading its
        weights into the generators does when it dies first) is a LearnerDied, which
        `run_ppo` recovers from."""
        try:
            return get_results(refs, self.timeout, what, watch=self._watch)
        except RoleFailed as err:
            dead = [] if isinstance(err, LearnerDied) else self.roles.learner.dead()
            if not dead:
                raise
            raise LearnerDied(f"{what}: {', '.join(dead)} died: {err}") from None


def _best_info(best: BestStep) -> dict:
    """What policy/metrics.json says of the step it holds, beside the run's totals."""
    return {
        "best_step": best.step,
        "eval_judge": best.judge,
        metrics.EVAL_SCORE: best.score,
        metrics.EVAL_KL: best.kl,
    }


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
