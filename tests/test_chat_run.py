"""Conversational data through every phase, outputs that load where users use them, and the
run seen where users look.

One smoke run on chat-formatted files (SFT `messages`, HH-shaped implicit-prompt pairs, prompts
as message lists), LoRA in every phase, a chat template of the user's own, and every tracker
(wandb offline, an mlflow file store); then each phase directory is read back with transformers
and peft alone, the trackers and the Ray metrics endpoint are read back, and report.html is
rendered in a headless browser.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from jobs import rlhf
from rlhf_ray.data import chat
from rlhf_ray.data.encoding import Limits, completion_ids, prompt_ids, sft_example
from rlhf_ray.data.jsonl import read_jsonl, write_jsonl
from rlhf_ray.data.prepare import gather_rows, prepare_run
from rlhf_ray.data.tokenizer import train_bpe_tokenizer
from rlhf_ray.errors import ConfigError, DataError
from rlhf_ray.models.forward import prompt_response, sequence_scores
from rlhf_ray.models.loading import FrozenModelSettings, load_frozen_scalar_model
from rlhf_ray.run import metrics
from rlhf_ray.run.trackers import read_metrics_log
from tests.conftest import (
    check_heldout_kl,
    raises_with,
    render_in_browser,
    smoke_config,
    wandb_offline_run,
)

# The embedded template with other role names: a template of the user's own, from a file.
USER_TEMPLATE = chat.EMBEDDED_CHAT_TEMPLATE.replace("'User: '", "'Human: '")
CONVERSATION = [
    {"role": "user", "content": "How do I boil an egg?"},
    {"role": "assistant", "content": "Put it in boiling water for eight minutes."},
]


WORDS = "tests.reward_functions_for_tests:words"


def _chat_files(tmp: Path) -> dict[str, str]:
    """The smoke preset's synthetic rows rewritten in TRL's conversational formats."""
    rows, _ = gather_rows(smoke_config(tmp / "unused").data, 0.1, 0)
    user, answer = chat.user_message, chat.assistant_message
    sft = [{"messages": user(r["prompt"]) + answer(r["completion"])} for r in rows["sft"]]
    pairs = [
        {k: user(r["prompt"]) + answer(r[k]) for k in ("chosen", "rejected")}
        for r in rows["preferences"] + rows["preferences_eval"]
    ]
    system = {"role": "system", "content": "Be helpful."}
    prompts = [{"prompt": [system, *user(rows["prompts"][0]["prompt"])]}]
    prompts += [{"prompt": user(r["prompt"])} for r in rows["prompts"][1:]]
    paths = {}
    for name, data in (("sft", sft), ("preference", pairs), ("prompt", prompts)):
        write_jsonl(tmp / f"{name}.jsonl", data)
        paths[f"data.{name}_path"] = str(tmp / f"{name}.jsonl")
    (tmp / "template.jinja").write_text(USER_TEMPLATE)
    paths["data.chat_template"] = str(tmp / "template.jinja")
    return paths


@pytest.fixture(scope="module")
def chat_run(local_ray, tmp_path_factory) -> tuple[Path, int]:
    tmp = tmp_path_factory.mktemp("chat-run")
    argv = ["--config", "smoke", "--output_dir", str(tmp / "out")]
    for key, value in _chat_files(tmp).items():
        argv += [f"--{key}", value]
    argv += ["--sft.method", "lora", "--reward.method", "lora", "--lora.r", "4"]
    argv += ["--resources.train_workers", "1"]  # chat data is the subject, not the workers
    argv += ["--run.report_to", "tensorboard", "wandb", "mlflow"]
    argv += ["--eval.judges", "reward_model", WORDS]  # users' data: judges beside the gold one
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")  # no account, no network: files under DIR/wandb
        env.setenv("WANDB_SILENT", "true")
        env.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: a file store in DIR
        with scrape_while_running(local_ray, tmp / "prometheus.txt"):
            return tmp / "out", rlhf.main(argv)


@contextmanager
def scrape_while_running(port: int, keep: Path):
    """Read the Prometheus endpoint every second while the run runs, as Prometheus would, and
    keep the last page that shows the PPO gauges: Ray drops a gauge from the endpoint a few
    seconds after its process stops setting it, so after the run it may be gone."""
    stop = threading.Event()

    def scrape() -> None:
        while not stop.wait(1.0):
            page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            if b"ray_rlhf_ppo_step{" in page:
                keep.write_bytes(page)

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


@pytest.mark.slow  # the chat run is a driver through every phase
def test_conversational_files_run_every_phase_and_are_judged(chat_run):
    out, code = chat_run
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["sft"]["format"] == "conversational messages"
    assert summary["data"]["preferences"]["format"] == "conversational implicit prompt"
    assert summary["data"]["eval_prompts"]["format"] == "conversational"  # synthetic, as chat
    assert summary["eval_prompts_judged"] == summary["eval_prompts"] == 8
    for name in ("sft", "policy", "ideal"):
        assert summary[f"gold_reward_{name}"] is not None
    assert summary["rm_accuracy_gold"] is not None


@pytest.mark.slow  # the chat run is a driver through every phase
@pytest.mark.slow  # the chat run is a driver through every phase
def test_eval_judges_score_base_sft_and_policy_and_the_policy_s_win_rate(chat_run, capsys):
    out, code = chat_run
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    for judge in ("reward_model", WORDS):
        for model in ("base", "sft", "policy"):
            assert isinstance(summary[f"{judge}_reward_{model}"], float), (judge, model)
        assert 0.0 <= summary[f"{judge}_win_rate_vs_sft"] <= 1.0
    assert summary["eval_judges"] == {"reward_model": "optimised by PPO", WORDS: "not trained on"}
    # the words judge by hand, from the samples the run wrote (one per prompt in the smoke preset)
    samples = read_jsonl(out / "eval_samples.jsonl")
    policy_words = [len(r["policy"][0].split()) for r in samples]
    assert summary[f"{WORDS}_reward_policy"] == pytest.approx(sum(policy_words) / len(samples))
    # during PPO: every step evaluated (the smoke preset's eval.every 1), in every tracker
    evaluated = [r for r in read_metrics_log(out, "ppo") if metrics.EVAL_SCORE in r]
    assert [r["step"] for r in evaluated] == [1, 2]
    best = max(evaluated, key=lambda r: (r[metrics.EVAL_SCORE], -r["step"]))
    assert summary["ppo_best_step"] == best["step"] == evaluated[-1][metrics.EVAL_BEST_STEP]
    check_heldout_kl(out, summary)


@pytest.mark.parametrize("folder", ["sft", "reward", "policy"])
def test_every_phase_directory_carries_the_chat_template_and_a_card(chat_run, folder):
    out, _ = chat_run
    assert AutoTokenizer.from_pretrained(out / folder).chat_template == USER_TEMPLATE
    card = (out / folder / "README.md").read_text()
    for part in ("tags: [rlhf-ray", "## Load", "## Data", "## Settings", "## Metrics"):
        assert part in card
    assert "conversational" in card and "LoRA r=4" in card
    adapter = out / folder / "adapter"  # LoRA in every phase here: each ships its adapter
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "README.md").exists()  # PEFT's blank template; the card above covers it


@pytest.mark.slow  # the chat run is a driver through every phase
def test_policy_card_has_the_gold_judge_numbers(chat_run):
    out, _ = chat_run
    card = (out / "policy" / "README.md").read_text()
    assert "| gold_reward_policy |" in card and "| win_rate_vs_sft |" in card


@pytest.mark.slow  # the chat run is a driver through every phase
def test_policy_adapter_on_the_base_model_equals_the_merged_policy(chat_run):
    """SFT and PPO adapters stacked into one on the original base: the policy in megabytes."""
    out, _ = chat_run
    config = json.loads((out / "policy" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == str(out / "base")
    tok = AutoTokenizer.from_pretrained(out / "policy")
    ids = tok.apply_chat_template(CONVERSATION, return_tensors="pt", return_dict=True)
    merged = AutoModelForCausalLM.from_pretrained(out / "policy")
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
        out / "policy" / "adapter",
    )
    with torch.no_grad():
        expected = merged(input_ids=ids["input_ids"]).logits
        got = adapted(input_ids=ids["input_ids"]).logits
    assert torch.allclose(got, expected, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    with torch.no_grad():  # and the adapter does change the model
        assert not torch.allclose(base(input_ids=ids["input_ids"]).logits, expected, atol=1e-3)


@pytest.mark.slow  # the chat run is a driver through every phase
def test_reward_model_loads_in_transformers_and_scores_as_rlhf_ray(chat_run):
    out, _ = chat_run
    tok = AutoTokenizer.from_pretrained(out / "reward")
    ids = tok.apply_chat_template(CONVERSATION, return_tensors="pt", return_dict=True)["input_ids"]
    model = AutoModelForSequenceClassification.from_pretrained(out / "reward").eval()
    with torch.no_grad():
        theirs = model(input_ids=ids).logits[0, 0]
    # rlhf-ray's scorer: prompt ids + response ids, read at the last real token
    cfg = smoke_config(out)
    limits = Limits(cfg.data.prompt_template, 64, 64, USER_TEMPLATE)
    query = prompt_ids(tok, CONVERSATION[:1], limits)
    response = completion_ids(tok, CONVERSATION[:1], CONVERSATION[1:], limits)
    assert query + response == ids[0].tolist()
    frozen = FrozenModelSettings(str(out / "reward"), cfg.model, cfg.quantization, 1, 0)
    scorer = load_frozen_scalar_model(frozen)
    seq, mask = prompt_response(
        torch.tensor([query]),
        torch.ones(1, len(query)),
        torch.tensor([response]),
        torch.ones(1, len(response)),
    )
    ours = sequence_scores(scorer, seq, mask.long())[0]
    assert abs(float(ours) - float(theirs)) < 1e-4


# --- the template's tokens, without a run ------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(["User: hi there\nAssistant: hello there friend"] * 4, 300)


def test_embedded_template_gives_the_text_format_s_tokens(tok):
    limits = Limits("User: {prompt}\nAssistant:", 64, 64)
    text = sft_example(tok, "hi there", "hello there", limits)
    conv = sft_example(
        tok, chat.user_message("hi there"), chat.assistant_message("hello there"), limits
    )
    assert conv == text


def test_a_completion_ends_at_eos_whatever_the_template_adds_after_it(tok):
    chatml = (
        "{% for m in messages %}{{ '<s>' + m['role'] + '\\n' + m['content'] + '</s>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
    )
    limits = Limits("{prompt}", 64, 64, chatml)
    ids = completion_ids(tok, chat.user_message("hi"), chat.assistant_message("hello"), limits)
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1


def test_a_template_that_rewrites_the_prompt_is_refused(tok):
    rewrites = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ ' ANSWER:' }}{% endif %}"
    )
    limits = Limits("{prompt}", 64, 64, rewrites)
    with raises_with("renders the prompt differently", "data.chat_template", exc=DataError):
        completion_ids(tok, chat.user_message("hi"), chat.assistant_message("yo"), limits)


# --- refused before Ray ------------------------------------------------------------------------


def test_text_and_conversational_files_in_one_run_are_refused(tmp_path):
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hi", "completion": "Hello."}])
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": chat.user_message("Hi")}])
    cfg = smoke_config(
        tmp_path / "out",
        **{
            "data.sft_path": str(tmp_path / "sft.jsonl"),
            "data.prompt_path": str(tmp_path / "p.jsonl"),
        },
    )
    with raises_with(
        "data.prompt_path holds message lists", "data.sft_path holds text", exc=DataError
    ):
        prepare_run(cfg)


def test_a_chat_template_with_a_syntax_error_names_the_setting_and_line(tmp_path):
    """Before: blamed on the first conversational row ('sft: the row whose prompt is ...')."""
    path = tmp_path / "chat.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}\n{% for x in %}")
    with raises_with(
        f"data.chat_template='{path}': not a Jinja template", "(line 2)", exc=ConfigError
    ):
        chat.read_template(str(path))
    with raises_with("data.chat_template='{{ m.content': not a Jinja template", exc=ConfigError):
        chat.read_template("{{ m.content")
    tracked = (
        "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    )
    assert chat.read_template(tracked) == tracked  # transformers' own tags compile


def test_a_model_without_a_chat_template_needs_one_for_chat_data(tmp_path):
    base = Path(prepare_run(smoke_config(tmp_path / "first")).base_path)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": chat.user_message("Hi")}])
    cfg = smoke_config(
        tmp_path / "out",
        **{"model.name_or_path": str(base), "data.prompt_path": str(tmp_path / "p.jsonl")},
    )
    with raises_with("has no chat template", "data.chat_template", exc=ConfigError):
        prepare_run(cfg)
    cfg = smoke_config(
        tmp_path / "out2",
        **{
            "model.name_or_path": str(base),
            "data.prompt_path": str(tmp_path / "p.jsonl"),
            "data.chat_template": USER_TEMPLATE,
        },
    )
    assert prepare_run(cfg).report["prompts"]["format"] == "conversational"


# --- the run, seen where users look ------------------------------------------------------------


def _last(out: Path, phase: str, name: str) -> tuple[int, float]:
    rows = [r for r in read_metrics_log(out, phase) if name in r]
    return rows[-1]["step"], rows[-1][name]


@pytest.mark.slow  # the chat run is a driver through every phase
def test_mlflow_file_store_holds_every_phase_s_metrics(chat_run):
    from mlflow.tracking import MlflowClient

    out, _ = chat_run
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("rlhf-ray").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert set(runs) == {"out-sft", "out-reward", "out-ppo"}
    for name in (metrics.KL, metrics.EVAL_SCORE):
        history = client.get_metric_history(runs["out-ppo"].info.run_id, name)
        logged = {r["step"]: r[name] for r in read_metrics_log(out, "ppo") if name in r}
        assert {m.step: m.value for m in history} == pytest.approx(logged) and logged
    sft_loss = client.get_metric_history(runs["out-sft"].info.run_id, metrics.SFT_LOSS)
    assert len(sft_loss) == len([r for r in read_metrics_log(out, "sft") if metrics.SFT_LOSS in r])
    assert runs["out-ppo"].data.params["ppo.steps"] == "2"


@pytest.mark.slow  # the chat run is a driver through every phase
def test_wandb_offline_runs_hold_every_step(chat_run):
    out, _ = chat_run
    runs = dict(wandb_offline_run(p) for p in (out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert set(runs) == {"out-sft", "out-reward", "out-ppo"}
    for phase, name in (("ppo", metrics.KL), ("sft", metrics.SFT_LOSS)):
        logged = {r["step"]: r[name] for r in read_metrics_log(out, phase) if name in r}
        tracked = {r["_step"]: r[name] for r in runs[f"out-{phase}"] if name in r}
        assert tracked == pytest.approx(logged) and logged


@pytest.mark.slow  # the chat run is a driver through every phase
def test_ray_metrics_endpoint_shows_the_ppo_gauges(chat_run):
    """The dashboard's Metrics view reads what this endpoint exports (and so does Prometheus):
    its last page showing the PPO gauges during the run holds the last step's values."""
    out, _ = chat_run
    wanted = {
        "ray_rlhf_objective_kl": _last(out, "ppo", metrics.KL)[1],
        "ray_rlhf_objective_scores": _last(out, "ppo", metrics.SCORES)[1],
        "ray_rlhf_rollout_generators": 1.0,
        "ray_rlhf_ppo_step": 2.0,
    }
    page = (out.parent / "prometheus.txt").read_text()
    found = {}
    for line in page.splitlines():
        name = line.split("{", 1)[0]
        if name in wanted and 'run="out"' in line:
            found[name] = float(line.rsplit(" ", 1)[1])
    assert found == pytest.approx(wanted)
    assert "ray_rlhf_rollout_completions_per_s{" in page


@pytest.mark.slow  # the chat run is a driver through every phase
def test_report_renders_in_a_browser_with_every_plot(chat_run):
    out, _ = chat_run
    shown = render_in_browser(out / "report.html", out / "report.png")
    assert {"ppo_steps", "time", "gold", "judges", "overoptimisation"} <= set(shown["images"])
    assert all(width > 100 for width in shown["images"].values()), shown
    assert shown["sample_rows"] == 8  # the smoke preset's held-out prompts, SFT and policy each
    assert "Not available" not in shown["text"]
