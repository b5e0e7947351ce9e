"""`DIR/report.html`: the run on one page, for a person. Written at the end of every run and by
`rlhf-ray report DIR`, from what the run left in DIR (nothing is recomputed):

  PPO score, KL and rewards over steps      DIR/metrics/ppo.jsonl
  time per phase and per PPO stage          DIR/summary.json (phase_seconds, ppo_stage_seconds)
  gold reward of base, SFT, policy, ideal   DIR/summary.json
  each eval.judges judge's mean score of    DIR/summary.json (<judge>_reward_<model>,
  base, SFT, policy; policy's win rate      <judge>_win_rate_vs_sft, eval_judges)
  over-optimisation (Gao et al. 2022)       DIR/metrics/ppo.jsonl: the reward model's score and
                                            the watching gold judge's, against KL, step by step
  SFT and policy answers to the same prompts  DIR/eval_samples.jsonl

Plots are PNG files in DIR/report/ and embedded in the page, so report.html alone can be sent.
A section whose source is missing (a run without PPO or evaluation) says so instead. A line or
file that is not JSON (a run killed while writing it, an edit gone wrong), a row without a key
the report reads, and a value of the wrong type are left out, and the page and stderr name each
(file, line, key): one bad line costs that line, one bad value that value, not the report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from pathlib import Path

from rlhf_ray.data.chat import check_messages, check_prompt_messages, prompt_text
from rlhf_ray.errors import DataError
from rlhf_ray.run import metrics
from rlhf_ray.run.trackers import metrics_log
from rlhf_ray.world.gold_judge import GoldJudge

REPORT_FILE = "report.html"
PLOTS_DIR = "report"
SAMPLES_SHOWN = 8
_GOLD = metrics.reward_source("gold_judge")
_RM = metrics.reward_source("reward_model")
GOLD_MODELS = ("base", "sft", "policy", "ideal")
HEADLINE = (
    "gold_reward_policy",
    "win_rate_vs_sft",
    "gap_closed",
    "kl_heldout",
    "kl_last_step",
    "ppo_best_step",
    "rm_accuracy",
)
# summary.json's keys the page reads: numbers (or null), and tables of seconds
_SUMMARY_NUMBERS = (*HEADLINE, *(f"gold_reward_{m}" for m in GOLD_MODELS))
_SUMMARY_TABLES = ("phase_seconds", "ppo_stage_seconds")
_SAMPLE_MODELS = ("sft", "policy")


def write_report(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no screen: draw to files
    sources = _Sources(out)
    summary = sources.summary("summary.json")
    ppo = sources.metrics(str(metrics_log(out, "ppo").relative_to(out)))
    scored_by_both = _scored_by_both(sources, ppo)
    sections = [
        _section("PPO over steps", _plot(out, "ppo_steps", _ppo_steps, ppo), _why_not(ppo)),
        _section("Time", _plot(out, "time", _time, summary), _why_not(summary, "summary.json")),
        _section(
            "Gold reward", _plot(out, "gold", _gold, summary), _why_not(summary, "summary.json")
        ),
        _section(
            "Judges of the held-out samples (eval.judges)",
            _plot(out, "judges", _judges, summary),
            _why_not(summary.get("eval_judges"), "eval_judges in summary.json"),
        ),
        _section(
            "Over-optimisation: reward model vs gold judge against KL",
            _plot(out, "overoptimisation", _overoptimisation, scored_by_both),
            _why_not(scored_by_both, "steps scored by both"),
        ),
        _samples(sources),
    ]
    for what in sources.skipped:
        print(f"[report] skipped {what}", file=sys.stderr)
    page = _page(out, summary, [*sections, _skipped(sources.skipped)])
    (out / REPORT_FILE).write_text(page, encoding="utf-8")
    return out / REPORT_FILE


# --- plots ---------------------------------------------------------------------------------------


def _plot(out: Path, name: str, draw, data) -> str | None:
    """An <img> of the figure `draw(data)` makes (also saved as DIR/report/<name>.png)."""
    if not data:
        return None
    import matplotlib.pyplot as plt

    figure = draw(data)
    if figure is None:
        return None
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    (out / PLOTS_DIR).mkdir(exist_ok=True)
    (out / PLOTS_DIR / f"{name}.png").write_bytes(buffer.getvalue())
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{name}" src="data:image/png;base64,{encoded}">'


def _ppo_steps(rows: list[dict]):
    import matplotlib.pyplot as plt

    panels = [
        ("score", [metrics.SCORES, metrics.EVAL_SCORE]),
        ("KL to the reference", [metrics.KL, metrics.EVAL_KL]),
        ("rewards", [metrics.RLHF_REWARD, _RM, _GOLD]),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (title, names) in zip(axes, panels, strict=True):
        for name in names:
            points = [(r["step"], r[name]) for r in rows if name in r]
            if points:
                ax.plot(*zip(*points, strict=True), label=name)
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        if ax.lines:  # a panel with no metric logged has nothing to name
            ax.legend(fontsize=8)
    return figure


def _time(summary: dict):
    import matplotlib.pyplot as plt

    phases = summary.get("phase_seconds") or {}
    stages = summary.get("ppo_stage_seconds") or {}
    if not phases and not stages:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    for ax, values, title in (
        (axes[0], phases, "seconds per phase"),
        (axes[1], stages, "PPO seconds per stage"),
    ):
        ax.barh(list(values), list(values.values()))
        ax.set_title(title)
        ax.set_xlabel("seconds")
    return figure


def _gold(summary: dict):
    import matplotlib.pyplot as plt

    models = [m for m in GOLD_MODELS if summary.get(f"gold_reward_{m}") is not None]
    if not models:
        return None
    figure, ax = plt.subplots(figsize=(6, 3.2))
    values = [summary[f"gold_reward_{m}"] for m in models]
    ax.bar(models, values, color=["#999", "#69c", "#d62", "#4a4"][: len(models)])
    for i, v in enumerate(values):
        ax.annotate(f"{v:.3f}", (i, v), ha="center", va="bottom", fontsize=9)
    ax.set_title("mean gold reward on held-out prompts")
    ax.axhline(0, color="black", linewidth=0.5)
    return figure


def _scored_by_both(sources: _Sources, rows: list[dict]) -> list[dict]:
    """The steps scored by the reward model and the gold judge, with their KL (a step without
    it is named)."""
    both = [r for r in rows if _GOLD in r and _RM in r]
    for row in both:
        if metrics.KL not in row:
            sources.skipped.append(
                f"{sources.line_of(row)}: no {metrics.KL!r} (left out of the over-optimisation "
                "plot)"
            )
    return [r for r in both if metrics.KL in r]


def _judges(summary: dict):
    """One panel per judge of eval.judges: its mean score of base, SFT and policy, and the
    policy's win rate against SFT; a judge PPO trained on is labelled so."""
    import matplotlib.pyplot as plt

    judges = summary.get("eval_judges")
    if not isinstance(judges, dict) or not judges:
        return None
    figure, axes = plt.subplots(1, len(judges), figsize=(4.5 * len(judges), 3.4), squeeze=False)
    for ax, (judge, kind) in zip(axes[0], judges.items(), strict=True):
        models = [
            m for m in ("base", "sft", "policy") if _is_number(summary.get(f"{judge}_reward_{m}"))
        ]
        values = [summary[f"{judge}_reward_{m}"] for m in models]
        ax.bar(models, values, color=["#999", "#69c", "#d62"][: len(models)])
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3f}", (i, v), ha="center", va="bottom", fontsize=9)
        rate = summary.get(f"{judge}_win_rate_vs_sft")
        ax.set_title(f"{judge}\n({kind})", fontsize=9)
        ax.set_xlabel(f"policy's win rate vs SFT: {rate:.3f}" if _is_number(rate) else "")
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0][0].set_ylabel("mean score on held-out prompts")
    return figure


def _overoptimisation(rows: list[dict]):
    import matplotlib.pyplot as plt

    kl = [r[metrics.KL] for r in rows]
    figure, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.scatter(kl, [r[_RM] for r in rows], s=12, label="reward model score (proxy)")
    ax.scatter(kl, [r[_GOLD] for r in rows], s=12, label="gold judge score (true)")
    ax.set_xlabel("KL(policy || reference) of the step's rollouts")
    ax.set_ylabel("mean score")
    ax.legend(fontsize=8)
    return figure


# --- page ----------------------------------------------------------------------------------------


def _samples(sources: _Sources) -> str:
    if not (sources.out / "eval_samples.jsonl").is_file():
        return _section("Sample responses", None, "no eval_samples.jsonl (evaluation skipped)")
    rows = sources.samples("eval_samples.jsonl")
    rows = [r for r in rows if all(m in r for m in _SAMPLE_MODELS)][:SAMPLES_SHOWN]
    if not rows:
        return _section("Sample responses", None, "no prompt was answered by both SFT and policy")
    judge = GoldJudge()
    cells = ["<tr><th>prompt</th><th>SFT</th><th>policy (PPO)</th></tr>"]
    for row in rows:
        text = prompt_text(row["prompt"])
        answers = "".join(_answer(judge, text, row[m][0]) for m in _SAMPLE_MODELS)
        cells.append(f"<tr><td>{html.escape(text)}</td>{answers}</tr>")
    table = f'<table class="samples">{"".join(cells)}</table>'
    return _section("Sample responses (held-out prompts, first sample each)", table, None)


def _answer(judge: GoldJudge, prompt: str, response: str) -> str:
    score = (
        f"<br><small>gold {judge.score(prompt, response).total:.2f}</small>"
        if judge.knows(prompt)
        else ""
    )
    return f"<td>{html.escape(response)}{score}</td>"


def _section(title: str, body: str | None, missing: str | None) -> str:
    content = (
        body
        if body is not None
        else f'<p class="missing">Not available: {html.escape(missing or "no data")}.</p>'
    )
    return f"<section><h2>{html.escape(title)}</h2>{content}</section>"


def _why_not(data, source: str = "metrics/ppo.jsonl") -> str | None:
    return None if data else f"no readable {source} in this run directory"


def _skipped(skipped: list[str]) -> str:
    if not skipped:
        return ""
    items = "".join(f"<li>{html.escape(what)}</li>" for what in skipped)
    return f'<section><h2>Skipped (not read)</h2><ul class="missing">{items}</ul></section>'


def _page(out: Path, summary: dict, sections: list[str]) -> str:
    headline = [(key, summary[key]) for key in HEADLINE if summary.get(key) is not None]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in headline)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rlhf-ray report: {html.escape(out.name)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 4px 8px;
text-align: left; vertical-align: top; }} img {{ max-width: 100%; }}
.missing {{ color: #a00; }} table.samples td {{ width: 33%; }}
</style></head><body>
<h1>rlhf-ray run: {html.escape(str(out))}</h1>
<table class="headline">{rows}</table>
{"".join(sections)}
</body></html>
"""


# --- reading the run directory -------------------------------------------------------------------


class _Sources:
    """The run directory's files, read leniently: what is not a JSON object, a row without a key
    the page reads and a value of the wrong type are left out and named in `skipped` ("FILE
    line N: why"), since a run killed mid-write leaves half a line and a hand edit anything."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.skipped: list[str] = []
        self._lines: dict[int, str] = {}  # id of a metrics row -> "FILE line N"

    def summary(self, name: str) -> dict:
        """summary.json, with the values the page reads checked: numbers (or null), and tables
        of seconds; a value of another type is left out."""
        summary = self.json(name)
        for key in _SUMMARY_NUMBERS:
            if key in summary and summary[key] is not None and not _is_number(summary[key]):
                self._drop(summary, key, f"{name}: {key!r}", "a number")
        for key in _SUMMARY_TABLES:
            if key in summary and not isinstance(summary[key], dict):
                self._drop(summary, key, f"{name}: {key!r}", "an object of seconds")
            for entry, value in list(summary.get(key, {}).items()):
                if not _is_number(value):
                    self._drop(summary[key], entry, f"{name}: {key}[{entry!r}]", "a number")
        return summary

    def metrics(self, name: str) -> list[dict]:
        """The rows of a metrics log, each with a number `step` and number values only: a row
        without a step is left out, a value that is no number dropped."""
        rows = []
        for where, row in self._rows(name):
            if not _is_number(row.get("step")):
                why = f"'step' is {_shown(row['step'])}" if "step" in row else "no 'step'"
                self.skipped.append(f"{where}: {why}, so none of the line is read")
                continue
            for key in [k for k, v in row.items() if not _is_number(v)]:
                self._drop(row, key, f"{where}: {key!r}", "a number")
            rows.append(row)
            self._lines[id(row)] = where
        return rows

    def line_of(self, row: dict) -> str:
        """Where a row `metrics` returned was read ("FILE line N")."""
        return self._lines[id(row)]

    def samples(self, name: str) -> list[dict]:
        """The rows of eval_samples.jsonl that have a prompt and, for each model present, a list
        of its responses."""
        rows = []
        for where, row in self._rows(name):
            problem = _sample_problem(row)
            if problem is None:
                rows.append(row)
            else:
                self.skipped.append(f"{where}: {problem}")
        return rows

    def json(self, name: str) -> dict:
        """The object in DIR/name; {} when it is missing or not a JSON object."""
        path = self.out / name
        if not path.is_file():
            return {}
        return self._object(path.read_text(encoding="utf-8", errors="replace"), name)

    def _rows(self, name: str) -> list[tuple[str, dict]]:
        """("FILE line N", the object) for each line of DIR/name; [] when it is missing."""
        path = self.out / name
        if not path.is_file():
            return []
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        rows = [(f"{name} line {n}", line) for n, line in enumerate(lines, 1)]
        located = [(where, self._object(line, where)) for where, line in rows]
        return [(where, row) for where, row in located if row]  # blank, skipped lines are {}

    def _drop(self, table: dict, key: str, where: str, expected: str) -> None:
        self.skipped.append(f"{where} is {_shown(table.pop(key))}, not {expected}")

    def _object(self, text: str, where: str) -> dict:
        if not text.strip():
            return {}
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            self.skipped.append(f"{where}: not JSON ({err.msg} at column {err.colno})")
            return {}
        if not isinstance(value, dict):
            self.skipped.append(f"{where}: a JSON {type(value).__name__}, not an object")
            return {}
        return value


def _sample_problem(row: dict) -> str | None:
    """Why a row of eval_samples.jsonl cannot be shown, or None."""
    if "prompt" not in row:
        return "no 'prompt'"
    if not isinstance(row["prompt"], (str, list)):
        return f"'prompt' is {_shown(row['prompt'])}, not text or a message list"
    if isinstance(row["prompt"], list):
        try:
            check_prompt_messages(check_messages(row["prompt"], "'prompt'", _any_text), "'prompt'")
        except DataError as err:
            return str(err)
    for model in _SAMPLE_MODELS:
        if model in row and not _responses(row[model]):
            return f"{model!r} is {_shown(row[model])}, not a list of responses (text)"
    return None


def _responses(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _any_text(text: str, where: str) -> None:
    """Text is shown as it is (escaped)."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: object) -> str:
    """A value as the JSON file spells it, cut short."""
    shown = json.dumps(value, ensure_ascii=False)
    return shown if len(shown) <= 60 else f"{shown[:57]}..."
