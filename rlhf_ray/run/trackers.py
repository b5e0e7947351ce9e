"""Where each phase's step metrics go: `DIR/metrics/<phase>.jsonl` always (the run's own record,
which report.html plots), and the experiment trackers `run.report_to` names, as TRL users
expect: tensorboard (`DIR/tb/<phase>`, the default), wandb, mlflow.

wandb and mlflow read their usual environment (WANDB_MODE, WANDB_PROJECT, MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME, ...); the driver captures those variables and every writer applies them
in its own process, so Ray Train workers on other nodes log where the driver was told to.

A writer opened at `purge_step` (a phase resumed from a checkpoint) logs the later steps again,
and each step shows once, with the resumed process's values, in: the metrics log; TensorBoard
(`purge_step` hides what an earlier process wrote from that step on); the phase's one active
mlflow run `<output dir name>-<phase>` (replaced when it holds later steps); and the newest of
the phase's wandb runs, one per process (see _Wandb and _Mlflow). Rows before `purge_step` that
a tracker gets again come from the metrics log, which a killed process has written to the last
step it logged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import netrc
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from rlhf_ray.config import Config
from rlhf_ray.errors import ConfigError

_ENV_PREFIXES = ("WANDB_", "MLFLOW_")
METRICS_DIR = "metrics"


@dataclass(frozen=True)
class TrackingSettings:
    output_dir: Path  # absolute
    report_to: tuple[str, ...]
    config: dict = field(default_factory=dict)  # the resolved config, "section.key" -> value
    env: dict = field(default_factory=dict)  # WANDB_* / MLFLOW_* of the driver's environment

    @property
    def run_name(self) -> str:
        return self.output_dir.name

    def run_id(self, phase: str) -> str:
        """Stable per output directory and phase: a resumed phase finds its mlflow run by it."""
        digest = hashlib.sha1(str(self.output_dir).encode()).hexdigest()[:8]
        return f"{self.run_name}-{phase}-{digest}"


def tracking_of(cfg: Config) -> TrackingSettings:
    """The run's tracking settings, with the driver's WANDB_* / MLFLOW_* environment."""
    flat = {f"{name}.{k}": v for name, section in asdict(cfg).items() for k, v in section.items()}
    env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
    return TrackingSettings(Path(cfg.run.output_dir).resolve(), cfg.run.report_to, flat, env)


def check_trackers(report_to: tuple[str, ...]) -> None:
    """Before any phase (a tracker that fails in a Ray Train worker costs restarts): every
    tracker named is installed, and wandb has a key unless it logs offline."""
    for name in report_to:
        if name in ("wandb", "mlflow") and importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"run.report_to includes {name}, but the {name} package is not installed; "
                f"pip install {name} (or leave {name} out of run.report_to)"
            )
    if "wandb" in report_to and not wandb_can_log():
        raise ConfigError(
            "run.report_to includes wandb, but wandb has no API key here (WANDB_API_KEY, or "
            "`wandb login` in ~/.netrc) and WANDB_MODE is not offline; log in, or set "
            "WANDB_MODE=offline to keep the runs in DIR/wandb (`wandb sync` uploads them later)"
        )


def wandb_can_log() -> bool:
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def metrics_log(output_dir: Path, phase: str) -> Path:
    return output_dir / METRICS_DIR / f"{phase}.jsonl"


def read_metrics_log(output_dir: Path, phase: str) -> list[dict]:
    """[{"step": n, name: value, ...}] in step order (empty when the phase logged nothing)."""
    path = metrics_log(output_dir, phase)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricWriter:
    """Scalars of one phase to its metrics log and to every tracker of `run.report_to`."""

    def __init__(self, settings: TrackingSettings, phase: str, purge_step: int = 1) -> None:
        os.environ.update(settings.env)
        self._log = _MetricLog(metrics_log(settings.output_dir, phase), purge_step)
        resume = _Resume(purge_step, self._log.kept_rows)
        opened = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}
        self._trackers = [opened[name](settings, phase, resume) for name in settings.report_to]

    def scalars(self, values: dict[str, float], step: int) -> None:
        values = {name: float(value) for name, value in values.items()}
        self._log.write(values, step)
        for tracker in self._trackers:
            tracker.write(values, step)

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()


@dataclass(frozen=True)
class _Resume:
    purge_step: int  # steps from here on are logged again by this process
    kept_rows: list[dict]  # the metrics log's rows before purge_step, {"step": n, name: value}


class _MetricLog:
    def __init__(self, path: Path, purge_step: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in _lines(path) if json.loads(line)["step"] < purge_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.path = path
        self.kept_rows = [json.loads(line) for line in kept]

    def write(self, values: dict[str, float], step: int) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def _lines(path: Path) -> list[str]:
    return [x for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _step_and_values(row: dict) -> tuple[int, dict[str, float]]:
    return row["step"], {name: value for name, value in row.items() if name != "step"}


class _TensorBoard:
    def __init__(self, settings: TrackingSettings, phase: str, resume: _Resume) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides what an earlier process wrote here from that step on
        log_dir = settings.output_dir / "tb" / phase
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume.purge_step)

    def write(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        # On disk now, not within SummaryWriter's 120 s: a killed process's steps before its
        # checkpoint are not logged again by the resumed one.
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _Wandb:
    """A new wandb run for each process of a phase, in group `<output dir name>`: wandb's
    generally available features cannot take logged steps back (a resumed run ignores steps at
    or below its last one; rewinding and forking a run are in private preview). The run is named
    `<output dir name>-<phase>`, or `...-<phase>-from-N` for a process resuming at purge_step
    N > 1, and first gets the metrics log's rows before N, so the newest run of a phase holds
    each step once. An earlier process's run stays as it was left; a killed one lacks what
    wandb had not yet written (it holds each step's row until the next step and writes its run
    file in batches)."""

    def __init__(self, settings: TrackingSettings, phase: str, resume: _Resume) -> None:
        import wandb

        name = f"{settings.run_name}-{phase}"
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "rlhf-ray"),
            name=name if resume.purge_step == 1 else f"{name}-from-{resume.purge_step}",
            group=settings.run_name,
            dir=str(settings.output_dir),
            config=settings.config,
            reinit="create_new",
        )
        for row in resume.kept_rows:
            step, values = _step_and_values(row)
            self.write(values, step)

    def write(self, values: dict[str, float], step: int) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


class _Mlflow:
    """One active mlflow run per phase, found by its `rlhf_ray_run` tag. MLflow cannot delete
    metric values, so a process resuming at a step the run already holds replaces the run: a new
    one (same name, tag and params) gets the metrics log's rows before purge_step, then the old
    one is deleted (mlflow's soft delete: restorable until `mlflow gc`). The copied values carry
    the time of the copy."""

    def __init__(self, settings: TrackingSettings, phase: str, resume: _Resume) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a file store in the run directory (which MLflow 3 keeps only on request)
            uri = (settings.output_dir / "mlruns").as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "rlhf-ray")
        found = client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else client.create_experiment(name)
        run_id = settings.run_id(phase)
        earlier = client.search_runs([experiment], f"tags.rlhf_ray_run = '{run_id}'")
        if earlier and self._last_step(earlier[0].info.run_id) < resume.purge_step:
            self._run_id = earlier[0].info.run_id
            client.update_run(self._run_id, status="RUNNING")
            return
        self._run_id = client.create_run(
            experiment, tags={"mlflow.runName": f"{settings.run_name}-{phase}"}
        ).info.run_id
        self._fill(settings.config, resume.kept_rows)
        # Tagged only once filled, so that a process killed while filling it leaves the earlier
        # run the one a resumed process finds.
        client.set_tag(self._run_id, "rlhf_ray_run", run_id)
        for run in earlier:
            client.delete_run(run.info.run_id)

    def write(self, values: dict[str, float], step: int) -> None:
        self._log_metrics(_metrics(values, step))

    def close(self) -> None:
        self._client.set_terminated(self._run_id)

    def _last_step(self, run_id: str) -> int:
        names = self._client.get_run(run_id).data.metrics
        steps = [m.step for name in names for m in self._client.get_metric_history(run_id, name)]
        return max(steps, default=0)

    def _fill(self, config: dict, kept_rows: list[dict]) -> None:
        params = [_param(k, str(v)[:6000]) for k, v in config.items()]
        for start in range(0, len(params), 100):  # mlflow takes 100 params per batch
            self._client.log_batch(self._run_id, params=params[start : start + 100])
        kept = [_step_and_values(row) for row in kept_rows]
        self._log_metrics([metric for step, values in kept for metric in _metrics(values, step)])

    def _log_metrics(self, batch: list) -> None:
        for start in range(0, len(batch), 1000):  # and 1000 metrics
            self._client.log_batch(self._run_id, metrics=batch[start : start + 1000])


def _metrics(values: dict[str, float], step: int) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(name, value, now, step) for name, value in values.items()]


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value)
