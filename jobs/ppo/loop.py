"""PPOLoop: PPO's iterations, each five named, timed stages:
  generate   every RolloutGenerator samples its shard of prompts  -> RolloutBatch refs
  score      RewardScorer.score(every batch ref)                  -> one Scores ref   } in
  reference  ReferenceModel.logprobs(batch ref)                   -> logprobs refs    } parallel
  learn      PPOLearner.train(all refs)                           -> scalar stats
  sync       PPOLearner.weights() put once, loaded by every generator
A step samples `ppo.samples_per_prompt` responses of each of its prompts; every sample carries
its prompt's group id, so the group estimators (RLOO, GRPO) find a prompt's samples whole even
when the shards split them over generators.
With `ppo.overlap` the next batches are generated while the learner updates, up to
`ppo.max_policy_lag` versions behind; `ppo.stale_batches` says whether the generators then wait
or run on, a step training on the newest batch (rlhf_ray/ppo/staleness.py). The batches asked
for and not yet trained on wait in `queue`, oldest first.
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

from jobs.ppo import checkpoint
from jobs.ppo.learner_group import GroupCall, LearnerDied
from jobs.ppo.pending import Pending
from jobs.ppo.recorder import StepRecorder
from jobs.ppo.roles import Roles
from jobs.ppo.rollout_queue import RolloutQueue, failed
from jobs.ppo.scaling import GeneratorScaler
from jobs.ppo.waiting import capacity_watch, get_results, wait_ready
from rlhf_ray.config import Config
from rlhf_ray.errors import RoleFailed, RunStopped
from rlhf_ray.ppo.run_state import PromptStream, RunTotals
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
        # the batches asked for and not yet trained on, oldest first
        self.queue = RolloutQueue(cfg, roles, prompts, self.scaler, self._wait, self.get)
        self.learner_version: int | None = None  # updates done, read at the first step

    def run(self, stop: StopRequest) -> dict:
        steps, done = self.ppo.steps, self.totals.step
        if done >= steps:
            print(f"[ppo] all {steps} steps were done before this run; nothing to train")
            return self.totals.summary(steps)
        for stale in stale_staged(self.out, self.best):  # evaluated after the checkpoint
            shutil.rmtree(stale)
        recorder = StepRecorder(self.cfg, self.totals, self.ledger, self.busy_clocks)
        if not self.queue:  # a restored run's batches were saved with its checkpoint
            self.queue.dispatch()
        for step in range(done + 1, steps + 1):
            trained, stats, times = self.step(steps_left=steps - step)
            if eval_due(step, self.eval_every, steps):
                stats |= self.evaluate(step)
            recorder.step_done(step, trained, stats, times)
            self.scaler.report(step)
            if stop.requested or self._checkpoint_due(step):
                save = functools.partial(self.save_checkpoint, step)
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
        return {name: ray.get(ref) for name, ref in asked.items() if not failed(ref)}

    def save_checkpoint(self, step: int) -> Path:
        """Everything `restore` needs to continue after `step` exactly as if never stopped."""
        started = time.perf_counter()
        # The batches asked for are finished and saved, so a resume neither loses nor redoes
        # them; each generator's RNG is read after them (actor calls run in order).
        self.queue.wait_all()
        queued = [self.get(pending.refs, "generating") for pending in self.queue]
        learner_tensors, learner_state = self.learner_call(
            self.roles.learner.checkpoint_state(), "the learner's state"
        )
        rngs = self.on_generators("rng_state", (), "generator RNG states")
        state = {
            "step": step,
            "learner": learner_state,
            "prompts": self.prompts.state(),
            "progress": dataclasses.asdict(self.totals),
            "queue": checkpoint.queue_info(self.queue, queued),
            "generator_ranks": list(rngs),
            "next_generator_rank": self.roles.next_rank,
            "rollouts_per_step": self.ppo.rollouts_per_step,
            "best": self.best.state(),
        }
        tensors = checkpoint.checkpoint_tensors(learner_tensors, rngs, queued)
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
        restoring = learner.restore(learner_tensors, state["learner"])
        self.learner_version = self.learner_call(restoring, "restoring")
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
        self.queue.restore(checkpoint.restored_queue(tensors, state))
        print(f"[ppo] resuming after step {state['step']} from {path}", flush=True)

    def evaluate(self, step: int) -> dict:
        """The held-out prompts sampled by a generator (which holds this step's weights) from
        the run's seed, scored, and their KL to the reference -> eval/* metrics; a step better
        than every earlier one is exported into its staging folder (best_step.py)."""
        started = time.perf_counter()
        self.queue.wait_all()  # queued first on the generators: not timed here
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

    def on_generators(self, method: str, args: tuple, what: str) -> dict:
        """rank -> result of `method(*args)` on every generator. With auto scaling one that died
        (its node left) is dropped instead: the next step is split over the others."""
        asked = {
            rank: getattr(g, method).remote(*args) for rank, g in self.roles.generators.items()
        }
        if self.ppo.autoscales:
            self._wait(list(asked.values()), what)
            lost = [rank for rank, ref in asked.items() if failed(ref)]
            if lost:
                self.scaler.drop(lost)
            asked = {rank: ref for rank, ref in asked.items() if rank not in lost}
        return dict(zip(asked, self.get(list(asked.values()), what), strict=True))

    def step(self, steps_left: int) -> tuple[Pending, dict, dict]:
        """One PPO iteration on the queue's next batch (`RolloutQueue.take`), `steps_left` steps
        to follow; -> the batch trained on, stats, stage times."""
        learner = self.roles.learner
        if self.learner_version is None:
            self.learner_version = self.learner_call(learner.version(), "the learner's version")
        trained, dropped = self.queue.take(self.learner_version)
        times = {"generate": trained.ready_at - trained.started_at}
        self.queue.fill(steps_left)  # with overlap: sampled while the learner updates
        batch_refs = trained.refs
        t = time.perf_counter()  # scoring and reference run in parallel: both timed from here
        scores_ref = self.roles.scorer.score.remote(*batch_refs)  # the whole step at once
        ref_refs = [self.roles.reference.logprobs.remote(b) for b in batch_refs]
        times["score"] = self._wait([scores_ref], "score", t)
        times["reference"] = self._wait(ref_refs, "reference", t)
        t = time.perf_counter()
        train = learner.train(list(zip(batch_refs, ref_refs, strict=True)), [scores_ref])
        self.queue.fill_until(train.refs, steps_left, self.timeout)
        stats = self.learner_call(train, "the learner update")
        self.learner_version += 1
        times["learn"] = time.perf_counter() - t
        if self.roles.board is None:
            # The generators load new weights after the batches asked for (calls run in
            # order): wait for those here, so their sampling is not counted as the sync's time.
            self.queue.wait_all()
        t = time.perf_counter()
        weights = learner.weights()  # put once, read by every generator
        self.sync(weights)
        times["sync"] = time.perf_counter() - t
        synced = object_bytes(weights, self.timeout)
        if synced is not None:
            stats[metrics.SYNC_BYTES] = synced
        self.scaler.release_retired(self.queue.oldest_serial())
        if not self.ppo.overlap and steps_left:
            self.queue.dispatch()
        stats[metrics.DROPPED] = dropped
        return trained, stats, times

    def sync(self, weights) -> None:
        """The update's weights to the generators: loaded after the batches asked for (calls
        run in order), or with partial rollouts posted on the run's board, where generators
        take them between chunks, also of the batches they are sampling now."""
        if self.roles.board is not None:
            posted = self.roles.board.post.remote(self.learner_version, [weights])
            self.get(posted, "posting the new weights")
            return
        self.on_generators("load_weights", (weights,), "loading new weights into the generators")

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
