"""run_ppo: phase 3 from the newest complete checkpoint (if any) to the exported policy.

Every `ppo.checkpoint_every` steps, and when the job is stopped (SIGTERM, as `ray job stop`
sends), the state to continue exactly goes to `<output_dir>/ppo_checkpoints/step-N/`
(jobs/ppo/checkpoint.py). Rerunning the same command resumes from the newest complete
checkpoint and gives the same steps as a run that was never stopped. If the learner's process
dies, every role is rebuilt from that checkpoint, up to `ppo.max_learner_restarts` times.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray

from jobs.commands import scale_command
from jobs.ppo.learner_group import LearnerDied
from jobs.ppo.loop import PPOLoop, StopRequest
from jobs.ppo.roles import create_roles
from jobs.ppo.scaling import start_control
from rlhf_ray.config import Config
from rlhf_ray.data.prepare import PreparedRun, read_rows
from rlhf_ray.ppo.run_state import PromptStream
from rlhf_ray.run import ppo_checkpoints as ckpt


def run_ppo(cfg: Config, prepared: PreparedRun) -> None:
    out = Path(cfg.run.output_dir).resolve()
    root = ckpt.checkpoints_root(out)
    removed = ckpt.remove_incomplete(root)
    if removed:
        print(f"[ppo] removed incomplete checkpoints a stopped run left: {', '.join(removed)}")
    prompts = [r["prompt"] for r in read_rows(prepared.data_dir, "prompts")]
    eval_prompts = [r["prompt"] for r in read_rows(prepared.data_dir, "eval_prompts")]
    control = start_control(cfg, out)
    address = ray.get_runtime_context().gcs_address
    print(
        f"[ppo] scale the rollout generators while this runs: {scale_command(address, out)}",
        flush=True,
    )
    try:
        with stop_on_sigterm() as stop:
            for rebuild in range(cfg.ppo.max_learner_restarts + 1):
                try:
                    return train_from_newest_checkpoint(
                        cfg, out, prompts, eval_prompts, control, stop
                    )
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


def train_from_newest_checkpoint(
    cfg: Config, out: Path, prompts: list, eval_prompts: list, control, stop
):
    """New roles, restored from the newest complete checkpoint if any; PPO to the last step,
    then the policy exported. Every role is stopped on the way out."""
    resume_from = ckpt.newest_complete(ckpt.checkpoints_root(out))
    roles = create_roles(cfg, out)
    stream = PromptStream(prompts, cfg.run.seed)
    loop = PPOLoop(cfg, roles, stream, out, control, eval_prompts=eval_prompts)
    try:
        if resume_from is not None:
            loop.restore(resume_from)
        loop.export(loop.run(stop))  # policy/: the best evaluated step; policy-last/: the last
    finally:
        roles.stop()
        loop.scaler.release_retired(oldest_waiting=loop.queue.asked)  # every one


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
