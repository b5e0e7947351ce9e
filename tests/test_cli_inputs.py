"""A new user's first mistakes with `rlhf-ray scale`, `rlhf-ray report` and `rlhf-ray config`
end quickly with a message naming what is wrong and what is expected, never a traceback or a
hang. No Ray cluster is started here: the scale commands point at addresses where none runs."""

from __future__ import annotations

import html
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import cli, commands
from jobs.scale import _default_address
from rlhf_ray.run import metrics

REPO = Path(__file__).resolve().parents[1]
QUICK_S = 15  # what "ends within seconds" means here, Python and Ray's import included


def _scale(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """`rlhf-ray scale --rollout 2 ...` in its own process -> (its result, its seconds)."""
    command = [sys.executable, "-m", "jobs.cli", "scale", "--rollout", "2", *args]
    start = time.monotonic()
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, timeout=QUICK_S + 15, env=env
    )
    return done, time.monotonic() - start


@pytest.fixture
def silent_port():
    """A TCP port that accepts connections and never answers (not a Ray GCS); -> (socket, port)."""
    with socket.create_server(("0.0.0.0", 0)) as server:  # Ray dials the node's IP, not 127.0.0.1
        yield server, server.getsockname()[1]


@pytest.mark.parametrize(
    ("address", "reason"),
    [("127.0.0.1:1", "connection refused"), ("no-such-host.invalid:6379", "unknown host")],
)
def test_scale_at_an_address_with_no_cluster_ends_quickly_naming_it(address, reason):
    done, seconds = _scale("--address", address)
    assert seconds < QUICK_S, done.stderr
    assert done.returncode == 1, done.stderr
    assert f"no Ray cluster at {address!r}" in done.stderr and reason in done.stderr
    assert "GCS address HOST:PORT" in done.stderr and "Traceback" not in done.stderr


def test_scale_at_a_port_that_is_not_a_ray_gcs_gives_up_quickly(silent_port):
    _, port = silent_port
    done, seconds = _scale("--address", f"127.0.0.1:{port}")
    assert seconds < QUICK_S, done.stderr
    assert done.returncode == 1, done.stderr
    assert f"no Ray GCS answered at '127.0.0.1:{port}'" in done.stderr
    assert "Traceback" not in done.stderr


def test_sigterm_while_scale_connects_ends_it_at_once(silent_port):
    server, port = silent_port
    command = [sys.executable, "-m", "jobs.cli", "scale", "--rollout", "2"]
    process = subprocess.Popen(
        [*command, "--address", f"127.0.0.1:{port}"], cwd=REPO, stderr=subprocess.PIPE
    )
    try:
        server.settimeout(QUICK_S)
        server.accept()[0].close()  # the command is connecting to the cluster now
        time.sleep(1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) != 0
    finally:
        process.kill()
        process.communicate()


def test_scale_given_the_dashboard_url_asks_for_the_gcs_address():
    url = "http://127.0.0.1:8265"
    done, _ = _scale("--address", url)
    assert done.returncode == 2, done.stderr
    assert f"--address {url} is the dashboard's URL" in done.stderr
    assert "the GCS address HOST:PORT" in done.stderr and "RAY_ADDRESS" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_dashboard_url_in_ray_address_is_not_handed_to_ray(monkeypatch):
    """RAY_ADDRESS is the dashboard's for `ray job submit` (docs/cluster.md): scale looks for the
    Ray on this machine instead, and ray.init must not read the URL back from the environment.
    (Not run as a command: "auto" would find whatever Ray this machine runs, a CI's included.)"""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert _default_address() == "auto"
    assert "RAY_ADDRESS" not in os.environ


@pytest.mark.parametrize(("mode", "prefix"), [("token", "RAY_AUTH_MODE=token "), ("disabled", "")])
def test_the_printed_scale_command_sets_the_token_mode_where_ray_uses_it(monkeypatch, mode, prefix):
    """Ray sends its token to an address given by hand only with RAY_AUTH_MODE=token: the job's
    command carries it where the job's Ray uses tokens (tests/test_first_run.py runs it)."""
    monkeypatch.setenv("RAY_AUTH_MODE", mode)
    command = commands.scale_command("10.0.0.1:6379", Path("/runs/a"))
    assert command.startswith(f"{prefix}{commands.rlhf_ray_script()} scale --rollout N ")
    assert command.endswith(" --address 10.0.0.1:6379 --output_dir /runs/a")


def test_the_printed_command_names_this_rlhf_ray_as_a_shell_finds_it(monkeypatch, tmp_path):
    """By name where PATH finds this install's script, else by its path (`make run` runs
    .venv/bin/rlhf-ray without .venv/bin on PATH): relative under the working directory."""
    script = Path(sys.executable).parent / "rlhf-ray"
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}/usr/bin")
    assert commands.rlhf_ray_script() == "rlhf-ray"
    monkeypatch.setenv("PATH", "/usr/bin")
    monkeypatch.chdir(script.parent.parent)
    assert commands.rlhf_ray_script() == f"{script.parent.name}/rlhf-ray"
    monkeypatch.chdir(tmp_path)
    assert commands.rlhf_ray_script() == os.path.abspath(script)


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("127.0.0.1:1", ("no Ray cluster at '127.0.0.1:1': connection refused",)),
        (":::", ("RAY_ADDRESS ':::' is not HOST:PORT",)),
        (
            "http://127.0.0.1:8265",
            ("RAY_ADDRESS http://127.0.0.1:8265 is the dashboard's URL", "ray job submit"),
        ),
    ],
)
def test_a_run_with_a_ray_address_where_no_cluster_is_ends_quickly_naming_it(
    tmp_path, address, parts
):
    """Before: a minute and more of Ray's retries for a port nothing listens on, a traceback
    for the dashboard's URL or a malformed address. Checked before the data is prepared."""
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "jobs.cli",
        "run",
        "--config",
        "smoke",
        "--output_dir",
        str(out),
    ]
    start = time.monotonic()
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env=os.environ | {"RAY_ADDRESS": address},
    )
    assert done.returncode == 2 and time.monotonic() - start < 60, done.stderr
    for part in parts:
        assert part in done.stderr
    assert "GCS address HOST:PORT" in done.stderr and "Traceback" not in done.stderr
    assert not (out / "data").exists()


# --- rlhf-ray report ------------------------------------------------------------------------


def _fake_run(out: Path) -> Path:
    """What a finished run leaves for its report: config, summary, PPO metrics, samples."""
    (out / "metrics").mkdir(parents=True)
    (out / "config.yaml").write_text("run: {}\n")
    summary = {"gold_reward_sft": 0.2, "gold_reward_policy": 0.5, "phase_seconds": {"sft": 3.0}}
    (out / "summary.json").write_text(json.dumps(summary))
    rows = [
        {"step": s, metrics.SCORES: 0.1 * s, metrics.KL: 0.05 * s, metrics.RLHF_REWARD: 0.1}
        for s in (1, 2, 3)
    ]
    _write_lines(out / "metrics" / "ppo.jsonl", [json.dumps(r) for r in rows])
    samples = [
        {"prompt": f"question {i}?", "sft": ["an answer"], "policy": ["a better one"]}
        for i in range(3)
    ]
    _write_lines(out / "eval_samples.jsonl", [json.dumps(s) for s in samples])
    return out


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def _report(capsys, out: Path) -> tuple[int, str]:
    """`rlhf-ray report DIR` -> (exit code, what it printed to stdout and stderr)."""
    code = cli.main(["report", str(out)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_report_skips_a_bad_metrics_line_and_names_it(capsys, tmp_path):
    out = _fake_run(tmp_path / "run")
    path = out / "metrics" / "ppo.jsonl"
    lines = path.read_text().splitlines()
    _write_lines(path, [lines[0], "{not json", *lines[1:]])
    code, printed = _report(capsys, out)
    assert code == 0, printed
    assert "skipped metrics/ppo.jsonl line 2" in printed and "Traceback" not in printed
    assert (out / "report" / "ppo_steps.png").is_file()  # the other steps are plotted
    assert "metrics/ppo.jsonl line 2" in (out / "report.html").read_text()


def test_report_skips_a_truncated_sample_and_names_it(capsys, tmp_path):
    out = _fake_run(tmp_path / "run")
    path = out / "eval_samples.jsonl"
    path.write_text(path.read_text()[:-20])  # a run killed while writing its last line
    code, printed = _report(capsys, out)
    assert code == 0, printed
    assert "skipped eval_samples.jsonl line 3" in printed
    assert "question 0?" in (out / "report.html").read_text()


def test_report_skips_a_corrupt_summary_and_names_it(capsys, tmp_path):
    out = _fake_run(tmp_path / "run")
    (out / "summary.json").write_text('{"gold_reward_sft": 0.')
    code, printed = _report(capsys, out)
    assert code == 0, printed
    assert "skipped summary.json" in printed and "Traceback" not in printed
    assert (out / "report" / "ppo_steps.png").is_file()


_GOLD, _RM = metrics.reward_source("gold_judge"), metrics.reward_source("reward_model")


@pytest.mark.parametrize(
    ("name", "row", "named"),
    [
        ("metrics/ppo.jsonl", {metrics.KL: 0.2}, "no 'step', so none of the line is read"),
        ("metrics/ppo.jsonl", {"step": "4", metrics.KL: 0.2}, "'step' is \"4\", so none"),
        (
            "metrics/ppo.jsonl",
            {"step": 4, metrics.SCORES: "high"},
            f"'{metrics.SCORES}' is \"high\"",
        ),
        (
            "metrics/ppo.jsonl",
            {"step": 4, _GOLD: 0.1, _RM: 0.2},
            f"no '{metrics.KL}' (left out of the over-optimisation plot)",
        ),
        ("eval_samples.jsonl", {"sft": ["a"], "policy": ["b"]}, "no 'prompt'"),
        (
            "eval_samples.jsonl",
            {"prompt": "q?", "sft": "an answer", "policy": ["b"]},
            "'sft' is \"an answer\", not a list of responses (text)",
        ),
        (
            "eval_samples.jsonl",
            {"prompt": [{"content": "q?"}], "sft": ["a"], "policy": ["b"]},
            "'prompt', message 0: key 'role' is missing",
        ),
        ("eval_samples.jsonl", {"prompt": 5, "sft": ["a"]}, "'prompt' is 5, not text or a message"),
    ],
)
def test_report_skips_a_row_without_what_it_reads_and_names_it(capsys, tmp_path, name, row, named):
    """JSON, but not what a run writes (a hand edit, another tool's file): the line (or value)
    is left out and named, file, line and key; the rest is reported."""
    out = _fake_run(tmp_path / "run")
    with open(out / name, "a", encoding="utf-8") as file:
        file.write(json.dumps(row) + "\n")
    code, printed = _report(capsys, out)
    assert code == 0, printed
    assert f"skipped {name} line 4: {named}" in printed and "Traceback" not in printed
    page = (out / "report.html").read_text()
    assert html.escape(f"{name} line 4: {named}") in page
    assert (out / "report" / "ppo_steps.png").is_file() and "question 0?" in page


def test_report_leaves_out_summary_values_of_the_wrong_type_and_names_them(capsys, tmp_path):
    out = _fake_run(tmp_path / "run")
    summary = json.loads((out / "summary.json").read_text())
    summary |= {"gold_reward_policy": "0.5", "phase_seconds": [3.0], "ppo_stage_seconds": {"a": {}}}
    (out / "summary.json").write_text(json.dumps(summary))
    code, printed = _report(capsys, out)
    assert code == 0, printed
    assert "skipped summary.json: 'gold_reward_policy' is \"0.5\", not a number" in printed
    assert "skipped summary.json: 'phase_seconds' is [3.0], not an object of seconds" in printed
    assert "skipped summary.json: ppo_stage_seconds['a'] is {}, not a number" in printed
    assert (out / "report" / "gold.png").is_file()  # gold_reward_sft is still drawn


@pytest.mark.parametrize(("name", "kind"), [("report.html", "Is a directory"), ("report", "")])
def test_report_where_its_page_or_plots_cannot_be_written(capsys, tmp_path, name, kind):
    out = _fake_run(tmp_path / "run")
    if kind:
        (out / name).mkdir()
    else:
        (out / name).write_text("a file where the plots go")
    code, printed = _report(capsys, out)
    assert code == 2 and "Traceback" not in printed, printed
    assert f"rlhf-ray: error: cannot write the report: {out / name}" in printed
    assert kind in printed and "no directory named report.html and no file named report" in printed


@pytest.mark.parametrize("what", ["empty directory", "missing", "file"])
def test_report_on_what_is_not_a_run_directory_says_so(capsys, tmp_path, what):
    path = tmp_path / "x"
    if what == "empty directory":
        path.mkdir()
    elif what == "file":
        path.write_text("hello")
    code, printed = _report(capsys, path)
    assert code == 2
    assert f"{path} is not an rlhf-ray run directory" in printed and "config.yaml" in printed


# --- usage ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_report_help_prints_its_usage(capsys, flag):
    assert cli.main(["report", flag]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: rlhf-ray report DIR") and captured.err == ""


@pytest.mark.parametrize("argv", [["run", "--help"], ["config", "show"]])
def test_output_into_a_pipe_closed_early_ends_quietly(argv):
    """`rlhf-ray run --help | head`: the reader leaves before the writing ends (before: a
    BrokenPipeError traceback)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdout.close()  # before the process has written anything
    _, err = process.communicate(timeout=QUICK_S + 15)
    assert process.returncode == cli.SIGPIPE_EXIT and err == "", err


def test_config_without_a_subcommand_prints_the_usage(capsys):
    assert cli.main(["config"]) == 2
    captured = capsys.readouterr()
    assert "rlhf-ray config show [--config" in captured.err
    assert "rlhf-ray config needs a subcommand: show" in captured.err


def test_config_help_prints_the_usage(capsys):
    assert cli.main(["config", "--help"]) == 0
    assert "usage: rlhf-ray config show" in capsys.readouterr().out
