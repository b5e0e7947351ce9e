"""Shared fixtures: one real local Ray for the session, and a tiny prepared run."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import ray

from jobs.ppo.loop import PPOLoop
from jobs.ppo.roles import create_roles
from rlhf_ray.config.command_line import parse_run_args
from rlhf_ray.data.jsonl import read_jsonl, write_jsonl
from rlhf_ray.data.prepare import prepare_run, read_rows
from rlhf_ray.data.tokenizer import load_tokenizer
from rlhf_ray.models.loading import load_scalar_model
from rlhf_ray.ppo.run_state import PromptStream
from rlhf_ray.run import fingerprints
from rlhf_ray.run.checkpoints import write_metrics
from rlhf_ray.train.settings import EVAL_SCORES_FILE

REPO = Path(__file__).resolve().parent.parent
# Ray Train's controller polls its workers every 2 s by default, so a phase ended up to 2 s
# after its last report, and each of the ~15 Ray Train phases in the suite waited for it (3 s of
# a smoke phase's 15 s, measured). Every Ray this session starts inherits it: the session's,
# the drivers' and the scenarios' clusters.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
DRIVER_TIMEOUT_S = 300
ROLE_TIMEOUT = 120  # seconds a test waits for a PPO role's answer


def raises_with(*parts, exc: type[Exception]):
    """pytest.raises(exc) whose message must contain every part (literally), in any order."""
    pattern = "(?s)" + "".join(f"(?=.*{re.escape(str(part))})" for part in parts)
    return pytest.raises(exc, match=pattern)


@pytest.fixture(scope="session")
def local_ray():
    """A real local Ray with 2 CPUs (never mocked), stopped at the end of the session; -> the
    port of its Prometheus metrics endpoint (exported every second, for the read-back test)."""
    port = free_port()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    yield port
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_config(output_dir: Path, **overrides: str):
    """The smoke preset with `--section.key value` overrides, parsed as the command line is."""
    argv = ["--config", "smoke", "--run.output_dir", str(output_dir)]
    for key, value in overrides.items():
        argv += [f"--{key}", value]
    return parse_run_args(argv)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A prepared smoke run whose `sft/` and `reward/` are the untrained base model.

    Actor tests need models with the right shapes, not trained ones; making them this way
    costs a second instead of two Ray Train phases.
    """
    return make_tiny_run(tmp_path_factory.mktemp("tiny-run"))


def make_tiny_run(out: Path, **overrides: str):
    """`tiny_run` of the smoke preset with `--section.key value` overrides -> (out, prepared)."""
    cfg = smoke_config(out, **overrides)
    prepared = prepare_run(cfg)
    base = Path(prepared.base_path)
    shutil.copytree(base, out / "sft")
    write_metrics(out / "sft", {"note": "untrained copy of the base, for actor tests"})
    tok = load_tokenizer(str(base))
    reward = load_scalar_model(base, cfg.model, cfg.quantization, tok.pad_token_id)
    reward.save_pretrained(out / "reward")
    tok.save_pretrained(out / "reward")
    write_metrics(out / "reward", {"eval_accuracy": 0.5})
    held_out = read_rows(prepared.data_dir, "preferences_eval")  # a report reads their scores
    write_jsonl(
        out / "reward" / EVAL_SCORES_FILE, [{"chosen": 0.0, "rejected": 0.0}] * len(held_out)
    )
    settings = fingerprints.phase_settings(cfg, prepared.data_dir)
    for phase in ("sft", "reward"):  # as a driver would have recorded them
        fingerprints.write_record(out, phase, settings[phase])
    return out, prepared


def session_ray_processes(*titles: str) -> list[psutil.Process]:
    """Live worker processes of this session's Ray whose title starts with one of `titles`
    (Ray titles an actor's process `ray::<Class>...`). The raylet starts every worker, so only
    its children are considered: no other Ray on the machine is ever touched."""
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for process in psutil.Process(raylet).children():
        try:
            if " ".join(process.cmdline()).startswith(titles):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


@contextmanager
def running_roles(cfg, out: Path):
    """The four PPO roles of `cfg` on `out`, killed at the end whatever happened."""
    roles = create_roles(cfg, out)
    try:
        yield roles
    finally:
        roles.stop()


def ppo_loop(cfg, roles, prepared) -> PPOLoop:
    """A new PPO loop of `cfg` (new prompt stream, step 0) driving `roles`, which a test steps
    itself (`dispatch`, `step`)."""
    prompts = [r["prompt"] for r in read_rows(prepared.data_dir, "prompts")]
    return PPOLoop(cfg, roles, PromptStream(prompts, cfg.run.seed), Path(cfg.run.output_dir))


def start_driver(out: Path, *args: str) -> subprocess.Popen:
    """The real driver (`python jobs/rlhf.py --config smoke`) on `out` in its own process,
    joined to the session's local Ray; its output is appended to `<out>.log` next to `out`."""
    command = [sys.executable, "jobs/rlhf.py", "--config", "smoke", "--output_dir", str(out)]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "a")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [*command, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
    )


def finish(process: subprocess.Popen, timeout: float = DRIVER_TIMEOUT_S) -> int:
    """The driver's exit code; killed if it runs past `timeout`."""
    try:
        return process.wait(timeout=timeout)
    finally:
        process.kill()


# Library output a person does not need (shown with --run.verbose true).
CONSOLE_NOISE = (
    "Writing model shards",
    "Loading weights",
    "LOAD REPORT",
    "FutureWarning",
    "DeprecationWarning",
    "Reporting training result",
    "Checkpoint successfully created",
    "Started a local Ray instance",
)


def check_console(logs: str, phases: tuple[str, ...]) -> None:
    """No library noise in a driver's output; for each of `phases`, progress lines
    `[phase] step i/n ... (elapsed, ~left)`, each step shown once."""
    for noise in CONSOLE_NOISE:
        assert noise not in logs, f"{noise!r} on the console:\n{logs[-3000:]}"
    for phase in phases:
        shown = [
            line.split(f"[{phase}] step ", 1)[1].split()[0]
            for line in logs.splitlines()
            if f"[{phase}] step " in line
        ]
        assert shown and len(shown) == len(set(shown)), (phase, shown)
        assert all("s left)" in line for line in logs.splitlines() if f"[{phase}] step " in line)


def run_scenario(module: str, *args: str) -> dict:
    """`python -m tests.<module> args` in its own process (it starts a Ray cluster of its own,
    which this session's Ray would clash with); -> the JSON line it printed last."""
    done = subprocess.run(
        [sys.executable, "-m", f"tests.{module}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_heldout_kl(out: Path, summary: dict) -> None:
    """summary.json's held-out KL is the mean and the largest of the exported policy's KL over
    every evaluation sample, as eval_samples.jsonl holds them."""
    kls = [kl for row in read_jsonl(out / "eval_samples.jsonl") for kl in row["policy_kl"]]
    assert len(kls) == summary["eval_prompts"] * summary["eval_samples_per_prompt"]
    assert summary["kl_heldout"] == pytest.approx(sum(kls) / len(kls), abs=1e-4)
    assert summary["kl_heldout_max"] == pytest.approx(max(kls), abs=1e-4)


def copy_outputs(source: Path, out: Path, folders: tuple[str, ...]) -> None:
    """Copy output folders ("base", "sft", "reward") of a run, with their settings records."""
    for folder in folders:
        shutil.copytree(source / folder, out / folder)
        record = fingerprints.record_path(source, folder)
        fingerprints.record_path(out, folder).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(record, fingerprints.record_path(out, folder))


def render_in_browser(page: Path, screenshot: Path) -> dict:
    """Open a local HTML page in headless Chromium (Playwright driving Debian's /usr/bin/chromium)
    as a person would, and report what shows: every <img> by alt text with its decoded width
    (0 = broken), the rows of the samples table, the visible text. Skipped where no Chromium is
    installed, unless RLHF_RAY_REQUIRE_BROWSER is set (.ci/run sets it and installs Chromium)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("RLHF_RAY_REQUIRE_BROWSER"):
            pytest.fail("no chromium on PATH, and RLHF_RAY_REQUIRE_BROWSER is set")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=flags)
        tab = browser.new_page(viewport={"width": 1200, "height": 900})
        tab.goto(page.resolve().as_uri())
        tab.wait_for_load_state("load")
        shown = tab.evaluate(
            """() => ({
                images: Object.fromEntries([...document.images].map(i => [i.alt, i.naturalWidth])),
                sample_rows: document.querySelectorAll("table.samples tr").length - 1,
                text: document.body.innerText,
            })"""
        )
        tab.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return shown


def wandb_offline_run(path: Path) -> tuple[str, list[dict]]:
    """(display name, history rows) of an offline wandb run file (`run-<id>.wandb`), read as
    wandb writes it: leveldb-log records (7-byte headers in 32 KiB blocks; kinds 1 full, 2
    first, 3 middle, 4 last) of `wandb_internal_pb2.Record` protobufs after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, pending, name, history = header, b"", None, []
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        chunk, pos = data[pos + header : pos + header + length], pos + header + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        if record.WhichOneof("record_type") == "run":
            name = record.run.display_name
        elif record.WhichOneof("record_type") == "history":
            items = record.history.item
            history.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            )
    return name, history
