"""Issue 26, a new user's first hour: settings that used to pass every check and fail only once
work had started (PEFT tracebacks in PPO, a learner that cannot start its threads, a reward
function that cannot take the call) are refused with exit 2 before any phase runs.

Each case runs the real driver entry point (`jobs/rlhf.py`'s `main`) in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import phases, rlhf
from rlhf_ray.config.command_line import parse_run_args
from rlhf_ray.data.prepare import prepare_run
from rlhf_ray.errors import ConfigError
from rlhf_ray.run import fingerprints
from rlhf_ray.run.checkpoints import write_metrics
from tests.conftest import smoke_config


def _run(capsys, out: Path, *args: str) -> str:
    """The driver's stderr, once it has exited 2 with no phase started."""
    return _refused(capsys, out, *args)[1]


def _refused_before_ray(capsys, out: Path, *args: str) -> str:
    """The driver's stderr, once it has exited 2 before it joined or started a Ray (whose line
    it prints as it does: cluster.join_cluster's or start_local's; a session's Ray may already
    run in this process)."""
    printed, err = _refused(capsys, out, *args)
    assert "Ray" not in printed, printed
    return err


def _refused(capsys, out: Path, *args: str) -> tuple[str, str]:
    """The driver's stdout and stderr, once it has exited 2 with no phase started."""
    code = rlhf.main(["--config", "smoke", "--output_dir", str(out), *args])
    printed = capsys.readouterr()
    assert code == 2, printed.err
    for phase in ("sft", "reward", "policy"):
        assert not (out / phase).exists(), f"the {phase} phase ran"
    return printed.out, printed.err


def test_lora_target_modules_that_match_nothing_in_the_model(tmp_path, capsys):
    out = tmp_path / "out"
    args = ("--lora.target_modules", "q_proj", "nonexistent_proj")
    err = _refused_before_ray(capsys, out, *args)
    given = "lora.target_modules=['q_proj', 'nonexistent_proj']"
    assert f"{given}: 'nonexistent_proj' matches no module of the embedded model" in err
    for linear in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert linear in err.split("linear modules")[1]
    assert not out.exists() or not any(out.iterdir())  # no base model, data, config written


def test_a_bad_target_module_leaves_an_earlier_run_as_it_was(tmp_path, capsys):
    """--run.redo sft would rebuild the embedded base model and rewrite the data: refused
    first, every file of the earlier run is as it was."""
    out = tmp_path / "out"
    prepare_run(smoke_config(out))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = ("--run.redo", "sft", "--data.num_sft", "7", "--lora.target_modules", "nope")
    assert "'nope' matches no module of the embedded model" in _refused_before_ray(
        capsys, out, *args
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_target_modules_of_a_model_directory(tmp_path, capsys):
    model = Path(prepare_run(smoke_config(tmp_path / "first")).base_path)
    out = tmp_path / "out"
    args = ("--model.name_or_path", str(model), "--lora.target_modules", "c_attn")
    err = _refused_before_ray(capsys, out, *args)
    assert f"'c_attn' matches no module of the model {model}; its linear modules: " in err
    assert not out.exists() or not any(out.iterdir())


def test_an_embedded_model_larger_than_this_machines_memory(tmp_path, capsys):
    """Before: a traceback from torch's allocator building it (or the kernel killing the
    driver, for sizes the allocator grants and the first write cannot have)."""
    out = tmp_path / "out"
    err = _refused_before_ray(capsys, out, "--model.hidden_size", "1048576")
    assert "model.hidden_size=1048576, model.intermediate_size=64, model.num_layers=1: " in err
    # q and o 2**20 x 2**20 each, k and v half that (1 of 2 heads), the MLP 3 x 2**20 x 64, the
    # embedding (tied) 259 x 2**20, three norms 2**20 each
    assert "the embedded model would have at least 3,299,010,936,832 parameters" in err
    assert "GiB of float32 weights, more than this machine's" in err
    assert not out.exists() or not any(out.iterdir())


def test_a_request_no_node_can_hold_is_refused_before_the_data_is_prepared(tmp_path, capsys):
    """Against this session's Ray where one runs, else the local Ray the run would start (that
    case, with no Ray in the process at all: tests/test_multinode.py)."""
    out = tmp_path / "out"
    err = _refused_before_ray(capsys, out, "--resources.train_worker_cpus", "4096")
    assert "the train worker asks for CPU=4096 per replica, but the largest node has" in err
    assert not out.exists() or not any(out.iterdir())  # no DIR/data, DIR/base, config.yaml


def test_learner_threads_beyond_the_largest_node_are_refused(tmp_path, capsys, local_ray):
    out = tmp_path / "out"
    err = _refused_before_ray(capsys, out, "--resources.learner_threads", "100000")
    assert "resources.learner_threads=100000" in err
    assert "at most 2" in err and "largest node" in err  # the session's local Ray has 2 CPUs
    assert not (out / "data").exists()  # refused before the data was prepared


def test_a_reward_function_that_cannot_take_the_call_is_refused(tmp_path, capsys):
    err = _refused_before_ray(capsys, tmp_path / "out", "--scoring.functions", "os:system")
    assert "scoring.functions: 'os:system'" in err
    assert "prompts=" in err and "completions=" in err


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--ppo.steps", "3", "--ppo.steps", "4"], "--ppo.steps"),
        (["--output_dir", "a", "--output_dir", "b"], "--output_dir"),
        (["--output_dir", "a", "--run.output_dir", "b"], "run.output_dir"),
        (["--output_dir=a", "--run.output_dir=b"], "run.output_dir"),
        (["--config", "smoke", "--config", "default"], "--config"),
        (["--phases", "sft", "--phases", "ppo"], "--phases"),
        (["--lora.target_modules", "q_proj", "--lora.target_modules", "v_proj"], "target_modules"),
    ],
)
def test_a_setting_given_twice_on_the_command_line_is_refused(argv, key):
    with pytest.raises(ConfigError, match="given twice") as refused:
        parse_run_args(argv)
    assert key in str(refused.value)


@pytest.mark.parametrize(
    "option",
    [
        "--data.sft_path",
        "--data.preference_path",
        "--data.prompt_path",
        "--data.eval_prompt_path",
        "--data.chat_template",
        "--output_dir",
        "--run.output_dir",
        "--model.name_or_path",
    ],
)
def test_an_empty_path_is_refused_naming_the_setting(option):
    with pytest.raises(ConfigError, match="=''"):
        parse_run_args(["--config", "smoke", option, ""])


def _data_report(capsys, out: Path, **data: str) -> str:
    """What the driver prints once the data is prepared."""
    cfg = smoke_config(out, **data)
    prepared = prepare_run(cfg)
    phases.print_data_report(cfg, prepared.report)
    phases.warn_of_trained_eval_prompts(prepared.data_dir)
    return capsys.readouterr().out


def test_held_out_prompts_that_are_also_trained_on_are_named(tmp_path, capsys):
    rows = [{"prompt": f"Say {word}.", "completion": word} for word in ("one", "two", "three")]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    held = [{"prompt": "Say two."}, {"prompt": "Say three."}, {"prompt": "Say four."}]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in held) + "\n")
    data = {"data.sft_path": str(tmp_path / "sft.jsonl")}
    data["data.eval_prompt_path"] = str(tmp_path / "eval.jsonl")
    printed = _data_report(capsys, tmp_path / "out", **data)
    assert "warning: 2 of the held-out eval prompts are also training prompts" in printed
    assert "'Say two.'" in printed


def test_synthetic_held_out_prompts_are_never_trained_on(tmp_path, capsys):
    printed = _data_report(capsys, tmp_path / "out")
    assert "[data] eval_prompts" in printed and "held-out eval prompts" not in printed


# --- what is in the output directory already --------------------------------------------------


def test_a_users_own_files_in_the_data_directory_are_kept(tmp_path, capsys):
    data = tmp_path / "proj" / "data"
    data.mkdir(parents=True)
    (data / "sft.jsonl").write_text('{"prompt": "Say one.", "completion": "one"}\n')
    (data / "notes.txt").write_text("my notes\n")
    err = _run(capsys, tmp_path / "proj", "--data.sft_path", str(data / "sft.jsonl"))
    assert "holds files rlhf-ray did not write (notes.txt, sft.jsonl)" in err
    assert sorted(p.name for p in data.iterdir()) == ["notes.txt", "sft.jsonl"]
    assert (data / "notes.txt").read_text() == "my notes\n"


@pytest.mark.parametrize(("phase", "folder"), [("sft", "sft"), ("ppo", "policy")])
def test_a_folder_where_a_phase_writes_its_model_is_kept(tmp_path, capsys, phase, folder):
    """Before: the phase trained, then could not write its model there (FileExistsError)."""
    mine = tmp_path / "proj" / folder
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes\n")
    code = rlhf.main(["--config", "smoke", "--output_dir", str(tmp_path / "proj")])
    printed = capsys.readouterr()
    assert code == 2 and "Ray" not in printed.out, printed.out
    err = printed.err
    assert f"run.output_dir: {mine} exists but is no complete output of the {phase} phase" in err
    assert "(it has no metrics.json)" in err
    assert (mine / "notes.txt").read_text() == "my notes\n"
    assert not (tmp_path / "proj" / "data").exists()


def test_a_run_refused_for_changed_settings_keeps_the_rows_it_was_trained_on(tmp_path, capsys):
    # a model directory: an embedded base would refuse the rows first (its tokenizer's digest)
    model = {"model.name_or_path": prepare_run(smoke_config(tmp_path / "first")).base_path}
    out = tmp_path / "out"
    prepared = prepare_run(smoke_config(out, **model))
    settings = fingerprints.phase_settings(smoke_config(out, **model), prepared.data_dir)
    fingerprints.write_record(out, "sft", settings["sft"])
    (out / "sft").mkdir()
    write_metrics(out / "sft", {"loss": 1.0})  # a complete SFT phase made with those rows
    before = {p.name: p.read_bytes() for p in prepared.data_dir.iterdir()}
    args = ["--model.name_or_path", model["model.name_or_path"], "--data.num_sft", "7"]
    code = rlhf.main(["--config", "smoke", "--output_dir", str(out), *args])
    printed = capsys.readouterr()
    assert code == 2 and "data.sft_rows_sha256" in printed.err, printed.err
    assert "Ray" not in printed.out, printed.out  # refused before it joined or started a Ray
    assert {p.name: p.read_bytes() for p in prepared.data_dir.iterdir()} == before
