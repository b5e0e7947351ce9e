"""Tests for the config dataclasses, the YAML loader and the command line (tyro).

Every error test checks that the message names the key (section.field), the bad value and what
is allowed, because that is what lets a user fix the command line or the preset.
"""

import inspect
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import ray
import yaml

from jobs import cli
from rlhf_ray.config import (
    Config,
    DataConfig,
    ModelConfig,
    PPOConfig,
    RunConfig,
    ScoringConfig,
    SFTConfig,
)
from rlhf_ray.config.command_line import parse_run_args
from rlhf_ray.config.loading import config_to_dict, load_config, preset_names
from rlhf_ray.data.prepare import gather_rows
from rlhf_ray.errors import ConfigError
from tests import conftest


def raises_with(*parts, exc=ConfigError):
    return conftest.raises_with(*parts, exc=exc)


def write_yaml(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def preset(name):
    assert name in preset_names()
    return name


def exit_2_message(capsys, argv) -> str:
    """Run the console script, expect exit 2 and no traceback; the stderr text, unwrapped."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # tyro exits 2 itself for a malformed argument
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", err).split())  # tyro draws a box and wraps


# --- presets ----------------------------------------------------------------------------------


def test_default_preset_loads_with_yaml_values_and_types():
    cfg = load_config()  # None -> the default preset
    assert isinstance(cfg, Config)
    assert cfg == load_config("default")
    assert cfg.model.is_embedded
    assert cfg.model.vocab_size == 1024
    assert cfg.data.num_preferences == 8000 and cfg.ppo.target_kl == 0.05
    assert cfg.sft.epochs == 10 and cfg.sft.lr == 0.002
    # YAML list -> tuple, so the frozen config stays hashable.
    assert cfg.lora.target_modules == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    # `train_worker_cpus: 1` is an int in YAML; the float field holds 1.0 of type float.
    assert cfg.resources.train_worker_cpus == 1.0
    assert type(cfg.resources.train_worker_cpus) is float
    # Keys the preset does not set keep the dataclass default.
    assert cfg.ppo.clip_range == 0.2 and cfg.ppo.lam == 0.95 and cfg.ppo.gamma == 1.0
    assert cfg.run.phases == ("sft", "reward", "ppo")


def test_smoke_preset_loads_and_is_small():
    cfg = load_config(preset("smoke"))
    assert cfg.model.is_embedded
    assert cfg.quantization.load_in_4bit is False
    # Small enough for tests: at most a few PPO steps on a 1-layer model.
    assert cfg.model.num_layers <= 2
    assert cfg.ppo.steps <= 5


def test_mistral_qlora_preset_is_the_lessons_recipe():
    cfg = load_config(preset("mistral-7b-qlora"))
    assert cfg.model.name_or_path == "mistralai/Mistral-7B-v0.1"
    assert cfg.model.gradient_checkpointing is True
    q = cfg.quantization
    assert (q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype) == (
        True,
        "nf4",
        True,
        "bfloat16",
    )
    lora = cfg.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (
        8,
        32,
        0.05,
        ("q_proj", "v_proj"),
    )
    assert cfg.sft.method == "lora" and cfg.reward.method == "lora"


def test_unknown_preset_names_the_presets_there_are():
    with raises_with("--config no-such-preset", "presets", "default"):
        load_config("no-such-preset")


def test_missing_yaml_file_is_an_error(tmp_path):
    with raises_with("no such file"):
        load_config(str(tmp_path / "nope.yaml"))


def test_a_preset_named_as_a_file_names_the_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with raises_with(
        "--config smoke.yaml: no such file; the preset of that name is --config smoke"
    ):
        load_config("smoke.yaml")
    with pytest.raises(ConfigError, match="no such file$"):
        load_config("elsewhere/smoke.yaml")  # a path: a file meant, not the preset


def test_config_to_dict_turns_tuples_into_lists():
    out = config_to_dict(Config())
    assert out["run"]["phases"] == ["sft", "reward", "ppo"]
    assert out["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert out["sft"]["epochs"] == 3


# --- command-line overrides (tyro) -------------------------------------------------------------


def test_space_and_equals_overrides_parse_to_the_field_types():
    cfg = parse_run_args(
        [
            "--sft.epochs",
            "2",  # int
            "--sft.lr=0.5",  # float, `=` form
            "--ppo.kl_coef",
            "-0.0",  # a leading '-' is a value, not an option
            "--run.progress_bar",
            "false",  # bool, as in YAML
            "--model.gradient_checkpointing=True",
            "--lora.target_modules",
            "q_proj",
            "k_proj",
            "v_proj",  # a list: space-separated values
            "--data.sft_path",
            "None",  # None for an optional field
            "--run.num_cpus",
            "3",  # int | None given a number
        ]
    )
    assert cfg.sft.epochs == 2 and type(cfg.sft.epochs) is int
    assert cfg.sft.lr == 0.5 and type(cfg.sft.lr) is float
    assert cfg.ppo.kl_coef == 0.0
    assert cfg.run.progress_bar is False
    assert cfg.model.gradient_checkpointing is True
    assert cfg.lora.target_modules == ("q_proj", "k_proj", "v_proj")
    assert cfg.data.sft_path is None
    assert cfg.run.num_cpus == 3
    # Untouched keys keep the default preset's values.
    assert cfg.sft.batch_size == 32 and cfg.model.vocab_size == 1024


def test_none_clears_an_optional_field(tmp_path):
    path = write_yaml(tmp_path, "run:\n  num_cpus: 4\ndata:\n  prompt_path: p.jsonl\n")
    assert load_config(path).run.num_cpus == 4
    cfg = parse_run_args(["--config", path, "--run.num_cpus", "None", "--data.prompt_path=None"])
    assert cfg.run.num_cpus is None and cfg.data.prompt_path is None


def test_int_is_accepted_where_a_float_is_expected(tmp_path):
    # YAML `lr: 1` is an int; the float field gets 1.0, of type float.
    cfg = load_config(write_yaml(tmp_path, "sft:\n  lr: 1\nppo:\n  kl_coef: 0\n"))
    assert cfg.sft.lr == 1.0 and type(cfg.sft.lr) is float
    assert cfg.ppo.kl_coef == 0.0 and type(cfg.ppo.kl_coef) is float
    # On the command line "2" for a float field is 2.0.
    cfg = parse_run_args(["--sft.lr", "2"])
    assert cfg.sft.lr == 2.0 and type(cfg.sft.lr) is float


def test_output_dir_and_phases_shortcuts():
    cfg = parse_run_args(["--output_dir", "/tmp/x", "--phases", "sft,reward"])
    assert cfg.run.output_dir == "/tmp/x"
    assert cfg.run.phases == ("sft", "reward")
    cfg = parse_run_args(["--output_dir=out2", "--phases=ppo"])
    assert cfg.run.output_dir == "out2" and cfg.run.phases == ("ppo",)
    cfg = parse_run_args(["--run.phases", "sft", "ppo"])  # the long form is a list
    assert cfg.run.phases == ("sft", "ppo")


def test_shortcut_and_the_same_key_given_as_override_are_refused():
    # Both name run.output_dir: which one was meant is the user's to say (issue 26).
    with pytest.raises(ConfigError, match="--run.output_dir given twice"):
        parse_run_args(["--run.output_dir", "a", "--output_dir", "b"])


def test_config_option_selects_a_yaml_file_then_overrides_apply(tmp_path):
    path = write_yaml(tmp_path, "sft:\n  epochs: 7\n  batch_size: 4\n")
    cfg = parse_run_args(["--config", path, "--sft.batch_size", "8"])
    assert cfg.sft.epochs == 7  # from the file
    assert cfg.sft.batch_size == 8  # the override wins
    assert cfg.model.vocab_size == 512  # file sets no model: dataclass default, not default.yaml


def test_help_lists_every_setting_with_type_default_and_description(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--config", "smoke", "--help"])
    assert exit_.value.code == 0
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", capsys.readouterr().out).split())
    cfg = load_config("smoke")
    for section in fields(Config):
        for setting in fields(getattr(cfg, section.name)):
            option = f"--{section.name}.{setting.name}"
            assert option in text, option
    # Type, the preset's value as default, and the field's comment as description:
    assert "--sft.epochs INT passes over the demonstrations (default: 1)" in text
    assert "--ppo.overlap {true,false} generate the next batch" in text
    assert "--lora.target_modules [STR [STR ...]]" in text
    assert "smoke" in text and "--config PRESET_OR_YAML" in text


def test_every_setting_has_a_description():
    # The comment on a field (same line, or the line above) is its line in --help.
    for section in fields(Config):
        cls = type(getattr(Config(), section.name))
        lines = Path(inspect.getsourcefile(cls)).read_text().splitlines()
        start = lines.index(f"class {cls.__name__}(Section):")
        for setting in fields(cls):
            at = next(
                i for i in range(start, len(lines)) if lines[i].startswith(f"    {setting.name}:")
            )
            described = "  # " in lines[at] or lines[at - 1].strip().startswith("#")
            assert described, f"{section.name}.{setting.name} has no description"


def test_config_show_prints_the_resolved_yaml(capsys):
    assert cli.main(["config", "show", "--config", "smoke", "--ppo.steps", "5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["ppo"]["steps"] == 5
    assert shown["model"]["hidden_size"] == load_config("smoke").model.hidden_size
    assert shown == config_to_dict(parse_run_args(["--config", "smoke", "--ppo.steps", "5"]))


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert re.fullmatch(r"rlhf-ray \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_help_and_errors_import_no_model_library():
    # `--help`, `config show` and a bad value load nothing from torch, transformers, peft or
    # bitsandbytes (whose import prints warnings on some machines).
    code = (
        "import sys; from jobs.cli import main\n"
        "assert main(['config', 'show', '--sft.epochs', '0']) == 2\n"
        "assert main(['config', 'show']) == 0\n"
        "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'ray') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "bitsandbytes" not in done.stderr.lower()


# --- errors that name the key ------------------------------------------------------------------


def test_unknown_section_or_key_on_command_line(capsys):
    assert "Unrecognized options: --sfx.epochs" in exit_2_message(
        capsys, ["run", "--sfx.epochs", "2"]
    )
    err = exit_2_message(capsys, ["run", "--sft.epoch", "2"])
    assert "--sft.epoch" in err and "--sft.epochs" in err  # tyro suggests the near miss


def test_unknown_section_in_yaml(tmp_path):
    with raises_with("unknown config section 'trainer'", "sections"):
        load_config(write_yaml(tmp_path, "trainer:\n  epochs: 2\n"))


def test_unknown_key_in_yaml_names_file_and_keys(tmp_path):
    path = write_yaml(tmp_path, "sft:\n  epoch: 2\n")
    with raises_with(path, "unknown key sft.epoch", "'epochs'"):
        load_config(path)


def test_wrong_type_in_yaml(tmp_path):
    with raises_with("sft.epochs='three'", "expected int"):
        load_config(write_yaml(tmp_path, "sft:\n  epochs: three\n"))
    # A bool is not an int, though Python's bool subclasses int.
    with raises_with("sft.epochs=True", "expected int"):
        load_config(write_yaml(tmp_path, "sft:\n  epochs: true\n"))
    # A float is not an int.
    with raises_with("sft.epochs=2.5", "expected int"):
        load_config(write_yaml(tmp_path, "sft:\n  epochs: 2.5\n"))
    with raises_with("lora.target_modules[0]=1", "expected str"):
        load_config(write_yaml(tmp_path, "lora:\n  target_modules: [1, 2]\n"))
    with raises_with("sft.epochs=None", "expected a value of type int"):
        load_config(write_yaml(tmp_path, "sft:\n  epochs: null\n"))


def test_section_that_is_not_a_mapping(tmp_path):
    with raises_with("section 'sft' must be a mapping"):
        load_config(write_yaml(tmp_path, "sft: 3\n"))


def test_yaml_that_is_not_a_mapping(tmp_path):
    with raises_with("expected a mapping of sections", "list"):
        load_config(write_yaml(tmp_path, "- sft\n- ppo\n"))


def test_scientific_notation_learning_rate_in_yaml(tmp_path):
    # 1e-3 = 0.001; 2e-4 = 0.0002
    cfg = load_config(write_yaml(tmp_path, "sft:\n  lr: 1e-3\nreward:\n  lr: 2e-4\n"))
    assert cfg.sft.lr == 0.001 and cfg.reward.lr == 0.0002


@pytest.mark.parametrize(
    ("argv", "parts"),
    [
        (["--sft.epochs", "three"], ("--sft.epochs", "invalid literal for int()", "'three'")),
        (["--sft.epochs=2.5"], ("--sft.epochs", "'2.5'")),
        (["--sft.lr", "fast"], ("--sft.lr", "'fast'")),
        (["--run.progress_bar", "maybe"], ("'maybe'", "--run.progress_bar", "'true'", "'false'")),
        # None only for optional fields; sft.epochs is a plain int.
        (["--sft.epochs", "None"], ("--sft.epochs", "'None'")),
        (["stray"], ("Unrecognized options: stray",)),
        (["--sft.epochs"], ("Missing value for argument '--sft.epochs'",)),
        # A flag with its value forgotten is blamed, not the next option's value.
        (["--sft.epochs", "--ppo.steps", "2"], ("Missing value for argument '--sft.epochs'",)),
    ],
)
def test_malformed_arguments_exit_2_naming_the_option(capsys, argv, parts):
    err = exit_2_message(capsys, ["run", *argv])
    for part in parts:
        assert part in err, err


@pytest.mark.parametrize(
    ("args", "parts"),
    [
        (["--sft.epochs", "0"], ("sft.epochs=0", "> 0")),
        (["--data.label_noise", "0.7"], ("data.label_noise=0.7", "[0, 0.5)")),
        (["--ppo.num_rollout_actors", "0"], ("ppo.num_rollout_actors=0", "> 0")),
        # 128 % 24 = 8, so 24 does not divide 128.
        (["--ppo.minibatch_size", "24"], ("ppo.minibatch_size=24", "divisor")),
        (["--phases", "sft,rl"], ("run.phases=", "subset of", "'ppo'")),
        (["--phases", "sft,sft"], ("run.phases=", "no phase twice")),
        # the long form takes a list: a comma list there is one unknown phase, and says how
        (["--run.phases", "sft,ppo"], ("run.phases=('sft,ppo',)", "--phases sft,reward")),
        (["--lora.dropout", "1.0"], ("lora.dropout=1.0", "fraction")),
        (["--model.dtype", "float8"], ("model.dtype='float8'", "bfloat16")),
        (["--model.hidden_size", "130"], ("model.hidden_size=130", "multiple of num_heads=4")),
        (["--resources.learner_gpus", "1.5"], ("resources.learner_gpus=1.5", "at most 1")),
        (["--resources.learner_workers", "0"], ("resources.learner_workers=0", "> 0")),
        (["--resources.learner_placement", "strict"], ("learner_placement='strict'", "spread")),
        (
            ["--resources.train_sharding", "zero3"],
            ("resources.train_sharding='zero3'", "one of ddp, fsdp"),
        ),
        (
            ["--resources.train_sharding", "fsdp", "--quantization.load_in_4bit", "true"]
            + ["--sft.method", "lora", "--reward.method", "lora"],
            ("resources.train_sharding='fsdp'", "quantization.load_in_4bit", "expected 'ddp'"),
        ),
        (
            ["--resources.learner_sharding", "zero3"],
            ("resources.learner_sharding='zero3'", "one of ddp, fsdp"),
        ),
        # FSDP2 in the learner shards a full-parameter critic: a run without one is refused
        (
            ["--resources.learner_sharding", "fsdp", "--ppo.estimator", "rloo"]
            + ["--ppo.samples_per_prompt", "2"],
            ("resources.learner_sharding='fsdp'", "ppo.estimator='rloo'", "expected 'ddp'"),
        ),
        (
            ["--resources.learner_sharding", "fsdp", "--reward.method", "lora"],
            ("resources.learner_sharding='fsdp'", "reward.method='lora'", "expected 'ddp'"),
        ),
        # the default preset's minibatches of 32 rows cannot be cut into 3 equal slices
        (
            ["--resources.learner_workers", "3"],
            ("ppo.minibatch_size=32", "multiple of resources.learner_workers=3"),
        ),
        (["--data.overlong", "drop"], ("data.overlong='drop'", "truncate, reject")),
        (["--ppo.gamma", "0"], ("ppo.gamma=0.0", "(0, 1]")),
        # Lists are space-separated; a bracketed or comma list is refused, never split.
        (["--lora.target_modules", "[q_proj,v_proj]"], ("lora.target_modules=", "q_proj v_proj")),
        (["--lora.target_modules", "q_proj,v_proj"], ("lora.target_modules=", "'q_proj,v_proj'")),
        # Below Ray's smallest unit of a resource (0.0001).
        (["--resources.reward_cpus", "0.00001"], ("resources.reward_cpus=1e-05", "0.0001")),
        # Non-finite numbers.
        (["--sft.lr", "nan"], ("sft.lr=nan", "finite")),
        (["--run.ray_timeout_s", "inf"], ("run.ray_timeout_s=inf", "finite")),
        # Templates with other fields, a conversion, or no {prompt}.
        (["--data.prompt_template", "Q: {prompt} {x}"], ("data.prompt_template=", "{prompt}")),
        (["--data.prompt_template", "Q: {prompt!r}"], ("data.prompt_template=", "exactly once")),
        (["--data.prompt_template", "Q: {0}"], ("data.prompt_template=", "{{")),
        (["--data.prompt_template", "Q: {prompt"], ("data.prompt_template=",)),
        # Shapes the Mistral architecture cannot build: 12 / 4 heads = 3, odd for rotary.
        (["--model.hidden_size", "12"], ("model.hidden_size=12", "even for rotary")),
        (["--model.num_kv_heads", "3"], ("model.num_kv_heads=3", "divisor of num_heads=4")),
        (
            ["--model.hidden_size", "96", "--quantization.load_in_4bit", "true"]
            + ["--sft.method", "lora", "--reward.method", "lora"],
            ("model.hidden_size=96", "multiple of 64"),
        ),
        # Command-line bytes that are not UTF-8 reach Python as surrogates.
        (["--run.output_dir", "out-\udcff"], ("run.output_dir=", "valid UTF-8")),
        # Estimators and reward sources.
        (["--ppo.estimator", "ppo"], ("ppo.estimator='ppo'", "gae, rloo, grpo, reinforce++")),
        (["--ppo.estimator", "grpo"], ("ppo.samples_per_prompt=1", "at least 2 with estimator")),
        (
            ["--ppo.estimator", "rloo", "--ppo.samples_per_prompt", "3"],
            ("ppo.rollouts_per_step=128", "multiple of samples_per_prompt=3"),
        ),
        (["--ppo.kl_placement", "both"], ("ppo.kl_placement='both'", "auto, reward, loss")),
        (["--scoring.functions", "mymodule"], ("scoring.functions=", "module:function")),
        (["--scoring.functions", "a:f", "a:f"], ("scoring.functions=", "no function twice")),
        (
            ["--scoring.functions", "a:f", "--scoring.function_weights", "1", "2"],
            ("scoring.function_weights=(1.0, 2.0)", "one weight per function (1)"),
        ),
        (
            ["--scoring.reward_model_weight", "0"],
            ("scoring.reward_model_weight=0.0", "or reward functions"),
        ),
        (["--scoring.reward_model_weight", "-1"], ("scoring.reward_model_weight=-1.0", ">= 0")),
        # AdamW's weight decay, a setting of every phase that trains.
        (["--sft.weight_decay", "-0.1"], ("sft.weight_decay=-0.1", ">= 0")),
        (["--reward.weight_decay", "-0.1"], ("reward.weight_decay=-0.1", ">= 0")),
        (["--ppo.weight_decay", "-0.1"], ("ppo.weight_decay=-0.1", ">= 0")),
        (["--ppo.weight_decay", "inf"], ("ppo.weight_decay=inf", "finite")),
        # Seeds torch, numpy or vLLM cannot take (before: a traceback building the base model).
        (["--run.seed", "99999999999999999999"], ("run.seed=99999999999999999999", "0 to 2147")),
        (["--run.seed", "-1"], ("run.seed=-1", "a whole number from 0 to 2147483647")),
    ],
)
def test_impossible_values_exit_2_naming_the_key_and_what_is_allowed(capsys, args, parts):
    err = exit_2_message(capsys, ["run", *args])
    assert err.startswith("rlhf-ray: error: "), err
    for part in parts:
        assert part in err, err


def test_a_leading_tilde_in_a_path_setting_is_the_users_home(tmp_path, monkeypatch):
    """As a shell would expand it; YAML and a quoted value keep `~` (before: the output
    directory was checked at ~ expanded, then written at a literal `~/...`, a traceback)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    args = ["--output_dir", "~/runs/a", "--model.name_or_path", "~/models/m"]
    args += ["--data.sft_path", "~/sft.jsonl", "--data.chat_template", "~/chat.jinja"]
    cfg = parse_run_args(args)
    assert (cfg.run.output_dir, cfg.model.name_or_path) == (
        f"{tmp_path}/runs/a",
        f"{tmp_path}/models/m",
    )
    assert (cfg.data.sft_path, cfg.data.chat_template) == (
        f"{tmp_path}/sft.jsonl",
        f"{tmp_path}/chat.jinja",
    )
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data:\n  prompt_path: ~/p.jsonl\n  eval_prompt_path: data/~x\n")
    cfg = load_config(str(yaml_file))
    assert (cfg.data.prompt_path, cfg.data.eval_prompt_path) == (f"{tmp_path}/p.jsonl", "data/~x")
    assert parse_run_args(["--model.name_or_path", "org/model"]).model.name_or_path == "org/model"


def test_impossible_value_in_yaml_names_the_section(tmp_path):
    with raises_with("sft.epochs=0", "a number > 0"):
        load_config(write_yaml(tmp_path, "sft:\n  epochs: 0\n"))
    with raises_with("sft.lr=nan", "finite"):
        load_config(write_yaml(tmp_path, "sft:\n  lr: .nan\n"))


def test_a_section_written_twice_in_yaml_is_refused(tmp_path):
    # Before: the second `sft` replaced the first, so epochs silently came from the preset.
    with raises_with("key 'sft' appears twice"):
        load_config(write_yaml(tmp_path, "sft: {epochs: 1}\nsft: {lr: 0.5}\n"))
    with raises_with("key 'epochs' appears twice"):
        load_config(write_yaml(tmp_path, "sft:\n  epochs: 1\n  epochs: 2\n"))


def test_a_comma_string_for_a_list_in_yaml_is_refused(tmp_path):
    # Before: one module named "q_proj,v_proj", found only when PPO built its adapter.
    with raises_with("lora.target_modules='q_proj,v_proj'", "YAML list"):
        load_config(write_yaml(tmp_path, 'lora:\n  target_modules: "q_proj,v_proj"\n'))


def test_yaml_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"run:\n  output_dir: out-\xff\n")
    with raises_with(str(path), "not valid UTF-8", "0xff", "line 2"):
        load_config(str(path))


def test_config_naming_a_directory_says_so(tmp_path):
    with raises_with(f"--config {tmp_path}", "is a directory", "YAML file"):
        load_config(str(tmp_path))


def test_user_yaml_without_data_settings_loads_and_prepares_its_rows(tmp_path):
    # Before: a built-in default (data.num_eval_prompts=128) the user never set was refused.
    cfg = load_config(write_yaml(tmp_path, "run:\n  output_dir: out\n"))
    rows, _ = gather_rows(cfg.data, cfg.reward.eval_fraction, cfg.run.seed)
    assert len(rows["eval_prompts"]) == cfg.data.num_eval_prompts == 64


def test_eval_prompt_count_is_only_checked_for_synthetic_eval_prompts(tmp_path):
    with raises_with("data.num_eval_prompts=500", "at most", "data.eval_prompt_path"):
        DataConfig(num_eval_prompts=500)
    assert DataConfig(num_eval_prompts=500, eval_prompt_path="eval.jsonl").num_eval_prompts == 500


def test_four_bit_rejects_full_fine_tuning():
    with raises_with("sft.method='full'", "4-bit", "'lora'", "quantization.load_in_4bit"):
        parse_run_args(["--quantization.load_in_4bit", "true"])
    with raises_with("reward.method='full'", "4-bit"):
        parse_run_args(["--quantization.load_in_4bit", "true", "--sft.method", "lora"])
    cfg = parse_run_args(
        ["--quantization.load_in_4bit", "true", "--sft.method", "lora", "--reward.method=lora"]
    )
    assert cfg.quantization.load_in_4bit and cfg.sft.method == cfg.reward.method == "lora"


def test_dataclasses_validate_directly():
    with raises_with("sft.epochs=0"):
        SFTConfig(epochs=0)
    with raises_with("data.label_noise=0.5"):  # the upper bound 0.5 is excluded
        DataConfig(label_noise=0.5)
    assert DataConfig(label_noise=0.0).label_noise == 0.0
    with raises_with("ppo.minibatch_size=4", "divisor"):
        PPOConfig(rollouts_per_step=10, minibatch_size=4)
    # 10 rollouts over 4 generators (3, 3, 2, 2 rows) is fine: shards need not be equal.
    assert PPOConfig(num_rollout_actors=4, rollouts_per_step=10, minibatch_size=5).steps == 40
    with raises_with("run.phases=()", "subset"):
        RunConfig(phases=())
    with raises_with("model.hidden_size=12", "rotary"):
        ModelConfig(hidden_size=12, num_heads=4, num_kv_heads=2)


# --- the console script and the driver fail before Ray starts -----------------------------------


def test_console_script_usage_and_unknown_commands(capsys):
    assert cli.main(["--help"]) == 0
    assert "usage: rlhf-ray run" in capsys.readouterr().out
    for argv, problem in (
        ([], "a command is required"),
        (["train"], "unknown command 'train'"),
        (["config", "edit"], "unknown command 'config edit'"),
    ):
        assert cli.main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert "usage: rlhf-ray run" in captured.err and problem in captured.err


@pytest.mark.parametrize(
    ("argv", "parts"),
    [
        (["--data.label_noise=0.7"], ("data.label_noise=0.7",)),
        (["--config", "no-such-preset"], ("--config no-such-preset", "presets")),
    ],
)
def test_driver_exits_2_naming_the_key_before_ray_starts(capsys, argv, parts):
    from jobs.rlhf import main

    ray_before = ray.is_initialized()  # a session's local Ray may be up already
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-ray: error: ")
    for part in parts:
        assert part in err
    assert ray.is_initialized() == ray_before  # the driver started no Ray


def test_driver_rejects_a_phase_whose_input_is_missing(capsys, tmp_path):
    from jobs.rlhf import main

    # The reward phase needs <output_dir>/sft from an earlier run; tmp_path has none.
    ray_before = ray.is_initialized()
    assert main(["--output_dir", str(tmp_path), "--phases", "reward"]) == 2
    err = capsys.readouterr().err
    assert "run.phases=reward" in err and "add sft to --phases" in err
    assert ray.is_initialized() == ray_before
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_console_script_run_forwards_to_the_driver(capsys):
    ray_before = ray.is_initialized()
    assert "sft.epochs=0" in exit_2_message(capsys, ["run", "--sft.epochs", "0"])
    assert ray.is_initialized() == ray_before


def test_reward_sources_from_yaml(tmp_path):
    cfg = load_config(
        write_yaml(
            tmp_path,
            "scoring:\n  reward_model_weight: 0\n  functions: [a.b:f, c:g]\n"
            "  function_weights: [1, -0.5]\n",
        )
    )
    assert cfg.scoring.functions == ("a.b:f", "c:g") and cfg.scoring.weights == (1.0, -0.5)
    assert not cfg.scoring.uses_reward_model
    assert ScoringConfig(functions=("a:f", "b:g")).weights == (1.0, 1.0)  # none given: 1 each
    with raises_with("scoring.function_weights[1]='x'", "expected float"):
        load_config(
            write_yaml(tmp_path, "scoring:\n  functions: [a:f, b:g]\n  function_weights: [1, x]\n")
        )
