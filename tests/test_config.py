"""Tests for the config dataclasses, the YAML/override loader and the command line.

Every error test checks that the message names the key (section.field), the bad value and what
is allowed, because that is what lets a user fix the command line or the preset.
"""

import pytest
import ray

from rlhf_ray import cli
from rlhf_ray.cli import parse_run_args
from rlhf_ray.config import Config, DataConfig, PPOConfig, RunConfig, SFTConfig
from rlhf_ray.config_loader import PRESET_DIR, config_to_dict, load_config
from rlhf_ray.errors import ConfigError
from tests import conftest


def raises_with(*parts, exc=ConfigError):
    return conftest.raises_with(*parts, exc=exc)


def write_yaml(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def preset(name):
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        pytest.skip(f"configs/{name}.yaml does not exist yet")
    return name


# --- presets ----------------------------------------------------------------------------------


def test_default_preset_loads_with_yaml_values_and_types():
    cfg = load_config()  # None -> the default preset
    assert isinstance(cfg, Config)
    assert cfg == load_config("default")
    assert cfg.model.is_embedded
    assert cfg.model.vocab_size == 1024
    assert cfg.data.num_preferences == 4000
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
    assert cfg.ppo.rollouts_per_step % cfg.ppo.num_rollout_actors == 0


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


def test_config_to_dict_turns_tuples_into_lists():
    out = config_to_dict(Config())
    assert out["run"]["phases"] == ["sft", "reward", "ppo"]
    assert out["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert out["sft"]["epochs"] == 3


# --- command-line overrides -------------------------------------------------------------------


def test_space_and_equals_overrides_parse_to_the_field_types():
    cfg = parse_run_args(
        [
            "--sft.epochs",
            "2",  # int
            "--sft.lr=0.5",  # float, `=` form
            "--ppo.kl_coef",
            "-0.0",  # a leading '-' is a value, not an option
            "--run.progress_bar",
            "false",  # bool
            "--model.gradient_checkpointing=yes",
            "--lora.target_modules",
            "q_proj, k_proj,v_proj",  # tuple from a comma list, spaces stripped
            "--data.sft_path",
            "none",  # None for an optional field
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


def test_none_words_clear_an_optional_field(tmp_path):
    path = write_yaml(tmp_path, "run:\n  num_cpus: 4\ndata:\n  prompt_path: p.jsonl\n")
    assert load_config(path).run.num_cpus == 4
    cfg = parse_run_args(["--config", path, "--run.num_cpus", "None", "--data.prompt_path=null"])
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


def test_shortcut_beats_the_same_key_given_as_override():
    # Both name run.output_dir; the shortcut is applied last.
    cfg = parse_run_args(["--run.output_dir", "a", "--output_dir", "b"])
    assert cfg.run.output_dir == "b"


def test_config_option_selects_a_yaml_file_then_overrides_apply(tmp_path):
    path = write_yaml(tmp_path, "sft:\n  epochs: 7\n  batch_size: 4\n")
    cfg = parse_run_args(["--config", path, "--sft.batch_size", "8"])
    assert cfg.sft.epochs == 7  # from the file
    assert cfg.sft.batch_size == 8  # the override wins
    assert cfg.model.vocab_size == 512  # file sets no model: dataclass default, not default.yaml


# --- errors that name the key ------------------------------------------------------------------


def test_unknown_section_on_command_line():
    with raises_with("unknown config section 'sfx'", "sections", "sft"):
        parse_run_args(["--sfx.epochs", "2"])


def test_unknown_key_on_command_line_lists_the_keys():
    with raises_with("unknown key sft.epoch", "keys of sft", "'epochs'"):
        parse_run_args(["--sft.epoch", "2"])


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
    with raises_with("lora.target_modules=", "expected a list of strings"):
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


def test_wrong_type_on_command_line():
    with raises_with("--sft.epochs='three'", "expected int"):
        parse_run_args(["--sft.epochs", "three"])
    with raises_with("--sft.epochs='2.5'", "expected int"):
        parse_run_args(["--sft.epochs=2.5"])
    with raises_with("--sft.lr='fast'", "expected float"):
        parse_run_args(["--sft.lr", "fast"])
    with raises_with("--run.progress_bar='maybe'", "expected true or false"):
        parse_run_args(["--run.progress_bar", "maybe"])
    # "none" only means None for optional fields; sft.epochs is a plain int.
    with raises_with("--sft.epochs='none'", "expected int"):
        parse_run_args(["--sft.epochs", "none"])


def test_malformed_arguments():
    with raises_with("unexpected argument 'stray'", "--section.key"):
        parse_run_args(["stray"])
    with raises_with("unexpected argument '--sft'"):
        parse_run_args(["--sft", "2"])
    with raises_with("--sft.epochs: missing value"):
        parse_run_args(["--sft.epochs"])


@pytest.mark.parametrize(
    ("args", "parts"),
    [
        (["--sft.epochs", "0"], ("sft.epochs=0", "> 0")),
        (["--data.label_noise", "0.7"], ("data.label_noise=0.7", "[0, 0.5)")),
        # 64 rollouts over 3 generators: 64 = 3 * 21 + 1, not a multiple.
        (
            ["--ppo.num_rollout_actors", "3"],
            ("ppo.rollouts_per_step=64", "multiple of num_rollout_actors=3"),
        ),
        # 64 % 24 = 16, so 24 does not divide 64.
        (["--ppo.minibatch_size", "24"], ("ppo.minibatch_size=24", "divisor")),
        (["--phases", "sft,rl"], ("run.phases=", "'rl'", "subset of", "'ppo'")),
        (["--phases", "sft,sft"], ("run.phases=", "no phase twice")),
        (["--lora.dropout", "1.0"], ("lora.dropout=1.0", "fraction")),
        (["--model.dtype", "float8"], ("model.dtype='float8'", "bfloat16")),
        (["--model.hidden_size", "130"], ("model.hidden_size=130", "multiple of num_heads=4")),
        (["--resources.learner_gpus", "1.5"], ("resources.learner_gpus=1.5", "whole number")),
        (["--data.overlong", "drop"], ("data.overlong='drop'", "truncate or reject")),
        (["--ppo.gamma", "0"], ("ppo.gamma=0.0", "(0, 1]")),
    ],
)
def test_impossible_values_name_the_key_and_what_is_allowed(args, parts):
    with raises_with(*parts):
        parse_run_args(args)


def test_impossible_value_in_yaml_is_prefixed_with_the_section(tmp_path):
    with raises_with("sft.epochs=0", "a number > 0"):
        load_config(write_yaml(tmp_path, "sft:\n  epochs: 0\n"))


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
    with raises_with("epochs=0"):
        SFTConfig(epochs=0)
    with raises_with("label_noise=0.5"):  # the upper bound 0.5 is excluded
        DataConfig(label_noise=0.5)
    assert DataConfig(label_noise=0.0).label_noise == 0.0
    with raises_with("rollouts_per_step=10", "num_rollout_actors=4"):
        PPOConfig(num_rollout_actors=4, rollouts_per_step=10, minibatch_size=5)
    # 12 = 4 * 3 and 12 = 6 * 2: valid.
    assert PPOConfig(num_rollout_actors=4, rollouts_per_step=12, minibatch_size=6).steps == 40
    with raises_with("phases=()", "subset"):
        RunConfig(phases=())


# --- the console script and the driver fail before Ray starts -----------------------------------


def test_console_script_help_and_usage(capsys):
    assert cli.main(["--help"]) == 0
    assert "usage: rlhf-ray run" in capsys.readouterr().out
    assert cli.main(["run", "--sft.epochs", "2", "-h"]) == 0
    assert "--section.key" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert cli.main(["train"]) == 2
    assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "parts"),
    [
        (["--sft.epochs", "three"], ("--sft.epochs='three'", "expected int")),
        (["--ppo.stepz", "3"], ("unknown key ppo.stepz", "steps")),
        (["--data.label_noise=0.7"], ("data.label_noise=0.7",)),
        (["--config", "no-such-preset"], ("--config no-such-preset",)),
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
    assert cli.main(["run", "--sft.epochs", "0"]) == 2
    assert "sft.epochs=0" in capsys.readouterr().err
    assert ray.is_initialized() == ray_before
