"""Tier 3: the smoke preset through every phase, in-process and through `ray job submit`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jobs import rlhf

REPO = Path(__file__).resolve().parent.parent
SUMMARY_KEYS = (
    "rm_accuracy",
    "gold_reward_base",
    "gold_reward_sft",
    "gold_reward_policy",
    "gold_reward_ideal",
    "win_rate_vs_sft",
    "kl_final",
    "ppo_tokens_per_s",
)
LOAD_AND_GENERATE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], use_safetensors=True)
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok("User: What is the capital of Peru?\\nAssistant:", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
print("generated", out.shape[1] - ids.shape[1], "tokens")
"""


def check_run_outputs(out: Path) -> dict:
    """Everything a finished run must leave behind; returns summary.json."""
    for phase in ("sft", "reward", "policy"):
        assert (out / phase / "metrics.json").is_file(), phase
        assert list((out / phase).glob("*.safetensors")), phase
    assert (out / "config.yaml").is_file()
    assert {p.parent.name for p in (out / "tb").rglob("events.out.tfevents.*")} == {
        "sft",
        "reward",
        "ppo",
    }
    summary = json.loads((out / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert summary[key] is not None, key
    assert summary["gold_reward_ideal"] == 1.0
    assert 0.0 <= summary["win_rate_vs_sft"] <= 1.0
    assert set(summary["phase_seconds"]) >= {"sft", "reward", "ppo"}
    assert set(summary["ppo_stage_seconds"]) == {"generate", "score", "reference", "learn", "sync"}
    return summary


@pytest.mark.e2e
def test_smoke_run_all_phases_then_resume_skips_them(local_ray, tmp_path, capsys):
    out = tmp_path / "run"
    assert rlhf.main(["--config", "smoke", "--output_dir", str(out)]) == 0
    first = check_run_outputs(out)
    assert first["eval_prompts"] == first["eval_prompts_judged"] == 8
    policy_mtime = (out / "policy" / "metrics.json").stat().st_mtime

    assert rlhf.main(["--config", "smoke", "--output_dir", str(out)]) == 0
    console = capsys.readouterr().out
    for phase, folder in (("sft", "sft"), ("reward", "reward"), ("ppo", "policy")):
        assert f"[{phase}] complete output in {out / folder}; skipped" in console
    assert (out / "policy" / "metrics.json").stat().st_mtime == policy_mtime

    # The exported policy is a plain Hugging Face model directory: a fresh process loads it.
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_GENERATE, str(out / "policy")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "generated 5 tokens" in done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A real `ray start --head` (dashboard on 127.0.0.1), stopped by killing only its group."""
    gcs, dashboard = _free_port(), _free_port()
    # Every fixed default port gets a free one: the session's local Ray may hold the defaults
    # (its dashboard agent on 52365 left this head with "No available agent to submit job").
    ports = [
        f"--{flag}={_free_port()}"
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
        head.wait(timeout=60)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_cli(args: list[str], env: dict, timeout: float = 60) -> tuple[int, str]:
    ray_bin = str(Path(sys.executable).parent / "ray")
    done = subprocess.run(
        [ray_bin, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    return done.returncode, done.stdout + done.stderr


def _wait_for_jobs_api(env: dict, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if _ray_cli(["job", "list"], env)[0] == 0:
            return
        time.sleep(2)
    raise TimeoutError(f"the Ray head's Jobs API did not answer within {seconds}s")


@pytest.mark.e2e
def test_ray_job_submit_smoke_round_trip(ray_head, tmp_path):
    address, env = ray_head
    env = {**env, "RAY_ADDRESS": address}
    out = tmp_path / "job-run"
    _wait_for_jobs_api(env, 90)
    submit = [
        "job",
        "submit",
        "--no-wait",
        "--submission-id",
        "smoke-job",
        "--working-dir",
        ".",
        "--",
        sys.executable,
        "jobs/rlhf.py",
        "--config",
        "smoke",
        "--output_dir",
        str(out),
    ]
    deadline = time.time() + 90
    code, submitted = _ray_cli(submit, env, timeout=120)
    while code != 0 and "try again later" in submitted and time.time() < deadline:
        time.sleep(3)  # the head's job agent starts a little after the Jobs API answers
        code, submitted = _ray_cli(submit, env, timeout=120)
    assert code == 0, submitted
    status, deadline = "", time.time() + 600
    while time.time() < deadline:
        status = _ray_cli(["job", "status", "smoke-job"], env)[1].lower()
        if any(word in status for word in ("succeeded", "failed", "stopped")):
            break
        time.sleep(5)
    logs = _ray_cli(["job", "logs", "smoke-job"], env)[1]
    assert "succeeded" in status, status + logs[-3000:]
    assert "joined the Ray cluster" in logs
    check_run_outputs(out)
