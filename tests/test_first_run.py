"""Tier 3: a run as its user meets it.

One smoke run through every phase (SFT and the reward model on Ray Train, PPO's four roles),
started as `rlhf-ray run` starts it: its own local Ray, with Ray's token authentication on as Ray
sets it up for a new local Ray, beside this session's Ray (two Rays on one machine, as on a
shared one), from a shell with no Ray variables and a home directory of its own (no token yet:
Ray writes one there). While PPO runs, the scale command and the dashboard the console names are
used exactly as printed; afterwards the console is read line by line against README's list.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rlhf_ray.run.ledger import RolloutLedger
from tests.conftest import DRIVER_TIMEOUT_S

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # a driver through every phase

REPO = Path(__file__).resolve().parent.parent
SCALE_LINE = "[ppo] scale the rollout generators while this runs: "
DASHBOARD_LINE = re.compile(
    r"dashboard at (http://\S+) \(it asks for Ray's token: the one in (.+)\)"
)
# More steps than the printed commands take to land (each starts Python and joins the cluster)
PPO_STEPS = 20
# A line at level E or W: Ray's C++ log lines ("[2026-12-04 16:08:31,233 E 4041 4129] ..."),
# Python logging's levels (Ray's format: "... WARNING file.py:85 -- ..."), a warning or exception
# as Python prints it ("UserWarning: ...", "ConnectionError: ..."), a traceback.
E_OR_W = re.compile(
    r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [EWF] \d+ \d+\]"
    r"|\b(WARNING|ERROR|CRITICAL)\b"
    r"|\b[A-Z]\w*(Warning|Error|Exception)\b:"
    r"|Traceback \(most recent call last\)"
)
RAY_PREFIX = re.compile(r"^(\x1b\[[0-9;]*m)?\(\w+ pid=\d+(, ip=\S+)?\)(\x1b\[[0-9;]*m)? ")


@dataclass
class FirstRun:
    code: int
    stdout: list[str]
    stderr: list[str]
    out: Path
    home: Path
    used: dict = field(default_factory=dict)  # what each command or page did, by name


def user_env(home: Path) -> dict[str, str]:
    """This process's environment as a new user's shell has it: no Ray or rlhf-ray variables (the
    session's Ray set RAY_AUTH_MODE here), and `home` as the home directory."""
    home.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RLHF_RAY_"))}
    return env | {"HOME": str(home)}


def _read_lines(stream, into: list[str], seen: threading.Event | None = None) -> None:
    for line in stream:
        into.append(line.rstrip("\n"))
        if seen is not None and SCALE_LINE in line:
            seen.set()


@pytest.fixture(scope="module")
def first_run(local_ray, tmp_path_factory) -> FirstRun:
    tmp = tmp_path_factory.mktemp("first-run")
    env = user_env(tmp / "home")
    script = str(Path(sys.executable).parent / "rlhf-ray")
    command = [script, "run", "--config", "smoke", "--output_dir", str(tmp / "out")]
    command += ["--ppo.steps", str(PPO_STEPS)]
    driver = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    run = FirstRun(-1, [], [], tmp / "out", tmp / "home")
    printed = threading.Event()
    readers = [
        threading.Thread(target=_read_lines, args=(driver.stdout, run.stdout, printed)),
        threading.Thread(target=_read_lines, args=(driver.stderr, run.stderr)),
    ]
    for reader in readers:
        reader.start()
    try:
        if printed.wait(DRIVER_TIMEOUT_S):
            run.used = use_as_printed(run, env)
        run.code = driver.wait(timeout=DRIVER_TIMEOUT_S)
    finally:
        driver.kill()
        for reader in readers:
            reader.join(timeout=30)
    return run


def use_as_printed(run: FirstRun, env: dict[str, str]) -> dict:
    """While PPO runs: the printed scale command (for 2 generators) as printed; then the
    dashboard with the token where its line says; then the command without the token mode, and
    with a wrong token, which are refused for the token. The cluster must still be up for all:
    the job's control (scaling) lives as long as PPO, the cluster until the run ends."""
    line = next(line for line in run.stdout if SCALE_LINE in line)
    command = line.split(SCALE_LINE, 1)[1].replace("--rollout N ", "--rollout 2 ")
    used = {"command": command, "printed": _shell(command, env)}
    used["dashboard"] = _dashboard_answers(run)
    used["no_mode"] = _shell(command.removeprefix("RAY_AUTH_MODE=token "), env)
    used["wrong_token"] = _shell(command, env | {"RAY_AUTH_TOKEN": secrets.token_hex(32)})
    return used


def _shell(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`command` as a user pastes it into a shell in the checkout."""
    return subprocess.run(
        ["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def _dashboard_answers(run: FirstRun) -> dict[str, int]:
    """HTTP status of the dashboard's jobs API without a token and with the token found where
    the console said (a `~` there is the run's home)."""
    line = next(line for line in run.stdout if "dashboard at " in line)
    url, where = DASHBOARD_LINE.search(line).groups()
    token = Path(where.replace("~", str(run.home), 1)).read_text().strip()
    answers = {}
    for name, headers in (("none", {}), ("printed", {"Authorization": f"Bearer {token}"})):
        request = urllib.request.Request(f"{url}/api/jobs/", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                answers[name] = answer.status
        except urllib.error.HTTPError as err:
            answers[name] = err.code
    return answers


def readme_console_lines() -> list[str]:
    """The lines README's "What the console shows" lists as allowed: each table row's first
    cell, in backticks (a part of the line, matched literally)."""
    text = (REPO / "README.md").read_text()
    section = text.split("### What the console shows", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)


def test_the_console_shows_no_line_at_level_e_or_w_but_those_readme_lists(first_run):
    assert first_run.code == 0, "\n".join(first_run.stdout[-40:] + first_run.stderr[-40:])
    allowed = readme_console_lines()
    assert allowed, "README lists no console lines: the section or its table moved"
    # Everything on stderr is Ray's, a library's or Python's (rlhf-ray writes only its errors
    # there); on stdout, rlhf-ray's own lines and worker lines, which must not be at E or W.
    flagged = first_run.stderr + [
        line for line in first_run.stdout if E_OR_W.search(RAY_PREFIX.sub("", line))
    ]
    unlisted = [line for line in flagged if line.strip() and not any(a in line for a in allowed)]
    assert not unlisted, "\n".join(unlisted)


def test_the_printed_scale_command_works_as_printed(first_run):
    used = first_run.used
    assert used, "the run printed no scale command"
    assert used["command"].startswith("RAY_AUTH_MODE=token ")  # the local Ray's token auth
    printed = used["printed"]
    assert printed.returncode == 0, printed.stderr
    assert "2 from its next step" in printed.stdout
    counts = [len(line["generators"]) for line in RolloutLedger(first_run.out).read()]
    assert counts[-1] == 2, counts  # the job did run 2 generators from then on


def test_the_dashboard_opens_with_the_token_where_its_line_says(first_run):
    assert first_run.used["dashboard"] == {"none": 401, "printed": 200}


def test_scale_without_the_token_says_the_token_is_the_problem(first_run):
    no_mode, wrong = first_run.used["no_mode"], first_run.used["wrong_token"]
    assert no_mode.returncode == 1
    assert "uses token authentication and this command sent no token" in no_mode.stderr
    assert "set RAY_AUTH_MODE=token" in no_mode.stderr
    assert wrong.returncode == 1
    assert "refused the authentication token from the RAY_AUTH_TOKEN variable" in wrong.stderr
    for done in (no_mode, wrong):
        assert "no Ray cluster" not in done.stderr
