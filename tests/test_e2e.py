"""Tier 3: the smoke preset via `ray job submit` to a real `ray start` head with token
authentication, stopped mid-PPO with `ray job stop` and submitted again.

The SFT and reward phases come complete from the tiny run (both submissions skip them, as a
resubmitted job skips what an earlier one finished); tests/test_chat_run.py trains every phase
in one run. Training them here again would add a minute to CI and test nothing new.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_ray.run import metrics
from rlhf_ray.run.best_step import eval_steps
from rlhf_ray.run.checkpoints import read_metrics
from rlhf_ray.run.ppo_checkpoints import checkpoints_root, complete_steps
from rlhf_ray.run.trackers import read_metrics_log
from tests.conftest import check_console, check_heldout_kl, copy_outputs, free_port

pytestmark = pytest.mark.slow  # a `ray start` head and `ray job submit`

REPO = Path(__file__).resolve().parent.parent
STOPPED_RUN_STEPS = 60
EVAL_EVERY = 7  # not a divisor of the steps: the last step is evaluated as well


def _check_best_step_export(out: Path, summary: dict) -> None:
    """policy/ is the evaluated step with the highest eval/score (the earliest of a tie), across
    the stop and the resume; policy-last/ the last step (a link to policy/ if that is the best);
    the staged weights are gone."""
    evaluated = [r for r in read_metrics_log(out, "ppo") if metrics.EVAL_SCORE in r]
    assert [r["step"] for r in evaluated] == eval_steps(EVAL_EVERY, STOPPED_RUN_STEPS)
    best = max(evaluated, key=lambda r: (r[metrics.EVAL_SCORE], -r["step"]))
    assert summary["ppo_best_step"] == best["step"] == evaluated[-1][metrics.EVAL_BEST_STEP]
    check_heldout_kl(out, summary)
    assert read_metrics(out / "policy")["best_step"] == best["step"]
    last = out / "policy-last"
    if best["step"] == STOPPED_RUN_STEPS:
        assert last.is_symlink() and last.resolve() == (out / "policy").resolve()
    else:
        assert read_metrics(last)["steps"] == STOPPED_RUN_STEPS and "best_step" not in read_metrics(
            last
        )
    assert not (out / "ppo_best").exists()


SUMMARY_KEYS = (
    "rm_accuracy",
    "gold_reward_base",
    "gold_reward_sft",
    "gold_reward_policy",
    "gold_reward_ideal",
    "win_rate_vs_sft",
    "kl_last_step",
    "ppo_tokens_per_s",
)


def check_run_outputs(out: Path, timed: tuple[str, ...]) -> dict:
    """Everything a finished run must leave behind; returns summary.json. `timed`: the phases
    this run trained (not those it found complete)."""
    for phase in ("sft", "reward", "policy"):
        assert (out / phase / "metrics.json").is_file(), phase
        assert list((out / phase).glob("*.safetensors")), phase
    assert (out / "config.yaml").is_file()
    assert {p.parent.name for p in (out / "tb").rglob("events.out.tfevents.*")} == set(timed)
    summary = json.loads((out / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert summary[key] is not None, key
    assert summary["gold_reward_ideal"] == 1.0
    assert 0.0 <= summary["win_rate_vs_sft"] <= 1.0
    assert set(summary["phase_seconds"]) == {*timed, "eval"}
    assert set(summary["ppo_stage_seconds"]) == {"generate", "score", "reference", "learn", "sync"}
    busy = summary["ppo_role_busy"]  # measured inside each role's process
    assert set(busy) == {"learner", "reward", "reference", "rollout-0"}, busy
    assert all(0.0 < share <= 1.0 for share in busy.values()), busy
    assert summary["ppo_rollout_generators"] == 1
    assert set(summary["ppo_generators_last_step"]) == {"rollout-0"}
    assert summary["ppo_generators_last_step"]["rollout-0"]["completions_per_s"] > 0
    return summary


@pytest.fixture
def ray_head(tmp_path):
    """A real `ray start --head` (dashboard on 127.0.0.1), stopped by killing only its group."""
    gcs, dashboard = free_port(), free_port()
    # Every fixed default port gets a free one: the session's local Ray may hold the defaults
    # (its dashboard agent on 52365 left this head with "No available agent to submit job").
    ports = [
        f"--{flag}={free_port()}"
        for flag in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "ray-client-server-port",
        )
    ]
    # Ray's token authentication, with a token of this test's own for the head and the client.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    # Ray's sockets live under --temp-dir and a Unix socket path may hold only 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rlhf-ray-", dir="/tmp")
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115 (stays open while the head runs)
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            "--include-dashboard=true",
            f"--temp-dir={temp_dir}",
            *ports,
        ],
        env=env,
        start_new_session=True,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # this head's processes only, not the session's Ray
        try:
            head.wait(timeout=2)
        except subprocess.TimeoutExpired:  # a graceful stop takes half a minute; no need here
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        log.close()
        _keep_head_logs(Path(temp_dir), tmp_path / "head-logs")
        shutil.rmtree(temp_dir, ignore_errors=True)


def _keep_head_logs(temp_dir: Path, keep: Path) -> None:
    """The head's own logs, kept with the test's files (pytest keeps the last runs' tmp_path):
    a job the head would not take ("No available agent to submit job") is explained there."""
    logs = temp_dir / "session_latest" / "logs"
    keep.mkdir()
    for name in ("dashboard.log", "dashboard_agent.log", "raylet.out", "gcs_server.out"):
        with contextlib.suppress(OSError):
            shutil.copyfile(logs / name, keep / name)


def _ray_cli(args: list[str], env: dict, timeout: float = 60) -> tuple[int, str]:
    ray_bin = str(Path(sys.executable).parent / "ray")
    done = subprocess.run(
        [ray_bin, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    return done.returncode, done.stdout + done.stderr


def _jobs_api(address: str, env: dict, path: str) -> dict | list | None:
    """GET the head's Jobs REST API with the test's token, as the CLI does; None until it
    answers. Polled here instead of through the `ray` CLI, each of whose calls costs ~2 s of
    CPU (a poll every 2 s took a core's half from the run it watched)."""
    request = urllib.request.Request(
        f"{address}/api/jobs/{path}", headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):  # the token was refused: waiting would not help
            raise
        return None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _wait_for_jobs_api(address: str, env: dict, seconds: float) -> None:
    deadline = time.time() + seconds
    while _jobs_api(address, env, "") is None:
        assert time.time() < deadline, f"the Ray head's Jobs API did not answer within {seconds}s"
        time.sleep(0.5)


def _submit(env: dict, job_id: str, out: Path, *args: str) -> None:
    """`ray job submit --no-wait` of the smoke run, retried while the head's job agent starts."""
    # More than a PPO step, so that `ray job stop` lands as SIGTERM, not as Ray's SIGKILL at 3 s.
    runtime_env = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}})
    submit = ["job", "submit", "--no-wait", "--submission-id", job_id, "--working-dir", "."]
    submit += ["--runtime-env-json", runtime_env, "--", sys.executable, "jobs/rlhf.py"]
    submit += ["--config", "smoke", "--output_dir", str(out), *args]
    deadline = time.time() + 90
    code, submitted = _ray_cli(submit, env, timeout=120)
    while code != 0 and "try again later" in submitted and time.time() < deadline:
        time.sleep(3)  # the head's job agent starts a little after the Jobs API answers
        code, submitted = _ray_cli(submit, env, timeout=120)
    assert code == 0, submitted


def _wait_for_status(address: str, env: dict, job_id: str, seconds: float) -> tuple[str, str]:
    """(final status as `ray job status` says it, job logs) once the job succeeded, failed or
    stopped."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        job = _jobs_api(address, env, job_id)
        if job is not None and job["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    status = _ray_cli(["job", "status", job_id], env)[1].lower()
    return status, _ray_cli(["job", "logs", job_id], env)[1]


def _refused_without_the_token(env: dict) -> None:
    """No token (401 Unauthorized) or a wrong one (403 Forbidden): nothing is submitted."""
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    refusals = (
        (no_token, "Unauthorized: Missing authentication token"),
        (wrong, "Forbidden: Invalid authentication token"),
    )
    for client, refusal in refusals:
        code, said = _ray_cli(["job", "submit", "--no-wait", "--", "true"], client)
        assert code != 0, said
        assert refusal in said, said[-2000:]
    assert _ray_cli(["job", "list"], env)[1].count("'entrypoint': 'true'") == 0


@pytest.mark.e2e
def test_ray_job_submit_stop_and_resubmit_round_trip(ray_head, tiny_run, tmp_path):
    """Token auth refuses strangers; `ray job stop` mid-PPO saves a checkpoint; the same job
    submitted again continues from it and finishes the run."""
    address, env = ray_head
    env = {**env, "RAY_ADDRESS": address}
    out = tmp_path / "job-run"
    copy_outputs(tiny_run[0], out, ("base", "sft", "reward"))
    _wait_for_jobs_api(address, env, 90)
    _refused_without_the_token(env)

    # Enough steps for the stop to land mid-PPO: a smoke step took 0.1-0.5 s (measured), and
    # `ray job stop` starts a CLI process (seconds): with 24 steps it once landed after the last
    # one. The progress lines a log gets, as users of `ray job logs` see them (the preset has
    # them off).
    steps = ("--ppo.steps", str(STOPPED_RUN_STEPS), "--run.progress_bar", "true")
    steps += ("--eval.every", str(EVAL_EVERY))
    _submit(env, "smoke-job", out, *steps)
    deadline = time.time() + 600
    while not complete_steps(checkpoints_root(out)):  # checkpoint_every 1 in smoke
        assert time.time() < deadline, _ray_cli(["job", "logs", "smoke-job"], env)[1][-3000:]
        time.sleep(0.2)
    code, said = _ray_cli(["job", "stop", "smoke-job"], env, timeout=120)
    assert code == 0, said
    status, logs = _wait_for_status(address, env, "smoke-job", 120)
    assert "stopped" in status, status + logs[-3000:]
    assert "Run the same command again to continue" in logs, logs[-3000:]  # SIGTERM handled
    check_console(logs, phases=())
    stopped_at = max(complete_steps(checkpoints_root(out)))
    assert 1 <= stopped_at < STOPPED_RUN_STEPS and not (out / "policy").exists()

    _submit(env, "smoke-job-again", out, *steps)
    status, logs = _wait_for_status(address, env, "smoke-job-again", 600)
    assert "succeeded" in status, status + logs[-3000:]
    assert "joined the Ray cluster" in logs
    for phase in ("sft", "reward"):  # complete phases are kept, not trained again
        assert f"[{phase}] complete output in {out / phase}; skipped" in logs
    assert f"[ppo] resuming after step {stopped_at}" in logs
    check_console(logs, phases=("ppo",))
    summary = check_run_outputs(out, timed=("ppo",))
    assert summary["eval_prompts"] == summary["eval_prompts_judged"] == 8
    assert read_metrics(out / "policy")["steps"] == STOPPED_RUN_STEPS
    _check_best_step_export(out, summary)

    # The exported policy is a plain Hugging Face model directory: transformers' Auto classes
    # load it and it generates.
    model = AutoModelForCausalLM.from_pretrained(out / "policy", use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(out / "policy")
    ids = tok("User: What is the capital of Peru?\nAssistant:", return_tensors="pt").input_ids
    generated = model.generate(
        ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id
    )
    assert generated.shape[1] - ids.shape[1] == 5
