"""A phase killed after step 6 and resumed from its step-3 checkpoint logs steps 4 to 6 again;
every tracker then shows each step 1..8 once, with the resumed process's values from step 4 on.

Each process is a real one: the first is killed with SIGKILL straight after logging (nothing
closed, as when a node dies), the second resumes with `purge_step=4` and closes. The trackers
are read back offline: TensorBoard's event reader, an mlflow file store, and wandb's offline run
files. wandb keeps a run per process; the newest one holds every step (see trackers._Wandb)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf_ray.run import metrics
from rlhf_ray.run.trackers import read_metrics_log
from tests.conftest import wandb_offline_run

KILLED_AFTER, RESUMED_AT, LAST = 6, 4, 8
# steps 1..3 from the first process (value = step), 4..8 from the resumed one (100 + step)
EXPECTED = {step: float(step if step < RESUMED_AT else 100 + step) for step in range(1, LAST + 1)}
PHASE = "ppo"

# One process of a phase: log steps `first`..`last` of metrics.KL (value = offset + step), then
# close the writer, or be killed with SIGKILL without closing anything.
_PROCESS = """
import os, signal, sys
from pathlib import Path
from rlhf_ray.run import metrics
from rlhf_ray.run.trackers import MetricWriter, TrackingSettings

out, first, last, offset, end = sys.argv[1:]
env = {k: v for k, v in os.environ.items() if k.startswith(("WANDB_", "MLFLOW_"))}
settings = TrackingSettings(Path(out), ("tensorboard", "wandb", "mlflow"), {"ppo.steps": 8}, env)
writer = MetricWriter(settings, "ppo", purge_step=int(first))
for step in range(int(first), int(last) + 1):
    writer.scalars({metrics.KL: float(offset) + step}, step)
if end == "close":
    writer.close()
else:
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _process(out: Path, first: int, last: int, offset: int, end: str, env: dict) -> None:
    args = [str(out), str(first), str(last), str(offset), end]
    done = subprocess.run(
        [sys.executable, "-c", _PROCESS, *args],
        env={**_without_trackers_env(os.environ), **env},
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    wanted = 0 if end == "close" else -9
    assert done.returncode == wanted, done.stderr[-3000:]


def _without_trackers_env(environ) -> dict:
    """The test's environment less any WANDB_* / MLFLOW_* setting of the machine's own."""
    return {k: v for k, v in environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    out = tmp_path_factory.mktemp("trackers") / "out"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # mlflow: a file store in out/
    _process(out, 1, KILLED_AFTER, 0, "kill", dict(env))
    _process(out, RESUMED_AT, LAST, 100, "close", dict(env))
    return out


def _exactly_once(steps_and_values: list[tuple[int, float]]) -> dict[int, float]:
    steps = [step for step, _ in steps_and_values]
    assert sorted(steps) == list(range(1, LAST + 1)), f"steps shown: {sorted(steps)}"
    return dict(steps_and_values)


def test_metrics_log_holds_each_step_once(resumed):
    rows = read_metrics_log(resumed, PHASE)
    assert _exactly_once([(r["step"], r[metrics.KL]) for r in rows]) == pytest.approx(EXPECTED)


def test_tensorboard_shows_each_step_once(resumed):
    events = EventAccumulator(str(resumed / "tb" / PHASE))
    events.Reload()
    shown = [(e.step, e.value) for e in events.Scalars(metrics.KL)]
    assert _exactly_once(shown) == pytest.approx(EXPECTED)


def test_mlflow_run_holds_each_step_once(resumed, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads file stores on request
    client = MlflowClient(tracking_uri=(resumed / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("rlhf-ray").experiment_id
    runs = client.search_runs([experiment])  # active runs only, as the UI lists them
    assert [r.info.run_name for r in runs] == [f"out-{PHASE}"]
    history = client.get_metric_history(runs[0].info.run_id, metrics.KL)
    assert _exactly_once([(m.step, m.value) for m in history]) == pytest.approx(EXPECTED)
    assert runs[0].data.params["ppo.steps"] == "8"


def test_newest_wandb_run_holds_each_step_once(resumed):
    files = sorted((resumed / "wandb").glob("offline-run-*/run-*.wandb"))  # named by start time
    name, rows = wandb_offline_run(files[-1])
    shown = [(r["_step"], r[metrics.KL]) for r in rows if metrics.KL in r]
    assert _exactly_once(shown) == pytest.approx(EXPECTED)
    assert name == f"out-{PHASE}-from-{RESUMED_AT}"
