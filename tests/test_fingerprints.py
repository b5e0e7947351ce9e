"""Tier 1: a rerun whose settings differ from what made a phase's outputs stops with exit 2
and the differing keys, before Ray starts; `--run.redo` deletes that phase and those after it.

No phase trains here: the outputs are stand-ins (a metrics file marks a phase complete), with
the settings records a driver writes when a phase starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import phases, rlhf
from jobs.ppo import roles
from rlhf_ray.config import PHASES
from rlhf_ray.data.prepare import prepare_run
from rlhf_ray.errors import ConfigError
from rlhf_ray.run import fingerprints
from rlhf_ray.run.checkpoints import phase_dir, write_metrics
from rlhf_ray.run.ppo_checkpoints import checkpoints_root
from rlhf_ray.train.launch import train_storage
from tests.conftest import raises_with, smoke_config


def _finished_run(out: Path, **overrides: str) -> None:
    """An output dir as a run with these settings leaves it: every phase complete, recorded."""
    cfg = smoke_config(out, **overrides)
    settings = _settings(cfg)
    for phase in PHASES:
        phase_dir(out, phase).mkdir(parents=True)
        write_metrics(phase_dir(out, phase), {})
        (out / "tb" / phase).mkdir(parents=True)
        fingerprints.write_record(out, phase, settings[phase])
    (checkpoints_root(out) / "step-2").mkdir(parents=True)


def _settings(cfg) -> dict[str, dict]:
    return fingerprints.phase_settings(cfg, prepare_run(cfg).data_dir)


def _rerun(out: Path, capsys, *args: str) -> tuple[int, str]:
    code = rlhf.main(["--config", "smoke", "--output_dir", str(out), *args])
    return code, capsys.readouterr().err


def test_a_changed_hyperparameter_stops_the_rerun_naming_it(tmp_path, capsys):
    _finished_run(tmp_path)
    code, err = _rerun(tmp_path, capsys, "--reward.lr", "0.01", "--ppo.kl_coef", "0.2")
    assert code == 2
    # The earliest phase whose settings differ is named, with old and new values.
    assert "its reward outputs were made with other settings" in err
    assert "reward.lr: 0.0005 then, 0.01 now" in err
    assert "--run.redo reward" in err and "new run.output_dir" in err
    assert "ppo.kl_coef" not in err  # reward's record does not hold PPO's settings


def test_changed_data_are_a_changed_setting(tmp_path, capsys):
    # A model directory: with the embedded model, the base's tokenizer (learned from every row)
    # is refused first (test_a_base_whose_tokenizer_learned_from_other_rows_is_refused).
    model = ("--model.name_or_path", prepare_run(smoke_config(tmp_path / "first")).base_path)
    out = tmp_path / "out"
    _finished_run(out, **{"model.name_or_path": model[1]})
    code, err = _rerun(out, capsys, *model, "--data.num_prompts", "40")
    assert code == 2
    assert "its ppo outputs" in err and "data.prompt_rows_sha256" in err


def test_settings_that_do_not_change_what_is_learned_may_change(tmp_path):
    _finished_run(tmp_path)
    changed = {"ppo.checkpoint_every": "5", "ppo.num_rollout_actors": "2", "run.ray_timeout_s": "9"}
    changed["resources.train_sharding"] = "fsdp"  # the same update, summed in another order
    cfg = smoke_config(tmp_path, **changed)
    current = _settings(cfg)
    phases.check_recorded_settings(tmp_path, current)  # does not raise: nothing differs
    for phase in PHASES:
        assert current[phase] == fingerprints.read_record(tmp_path, phase), phase


def test_redo_deletes_that_phase_and_every_later_one(tmp_path, capsys):
    _finished_run(tmp_path)
    storage = train_storage(tmp_path, "reward")
    storage.mkdir(parents=True)
    cfg = smoke_config(tmp_path, **{"reward.lr": "0.01", "run.redo": "reward"})
    current = _settings(cfg)
    redone = phases.phases_to_redo(cfg)
    assert redone == ("reward", "ppo")
    phases.check_recorded_settings(tmp_path, current, redone)  # the changed phase is redone
    phases.redo_phases(cfg, tmp_path)
    phases.check_recorded_settings(tmp_path, current)  # nothing left to differ
    for gone in (
        phase_dir(tmp_path, "reward"),
        phase_dir(tmp_path, "ppo"),
        tmp_path / "tb" / "reward",
        tmp_path / "tb" / "ppo",
        storage,
        checkpoints_root(tmp_path),
        fingerprints.record_path(tmp_path, "reward"),
        fingerprints.record_path(tmp_path, "ppo"),
    ):
        assert not gone.exists(), gone
    assert (phase_dir(tmp_path, "sft") / "metrics.json").is_file()
    assert fingerprints.record_path(tmp_path, "sft").is_file()
    assert f"[redo] deleted {phase_dir(tmp_path, 'reward')}" in capsys.readouterr().out


def test_a_base_model_built_with_other_settings_is_refused_unless_sft_is_redone(tmp_path):
    prepare_run(smoke_config(tmp_path))
    with raises_with("its base outputs", "model.hidden_size: 32 then, 64 now", exc=ConfigError):
        prepare_run(smoke_config(tmp_path, **{"model.hidden_size": "64"}))
    prepare_run(smoke_config(tmp_path, **{"model.hidden_size": "64", "run.redo": "sft"}))
    assert fingerprints.read_record(tmp_path, "base")["model.hidden_size"] == 64
    assert '"hidden_size": 64' in (tmp_path / "base" / "config.json").read_text()


def test_a_base_whose_tokenizer_learned_from_other_rows_is_refused(tmp_path):
    """The embedded tokenizer learns from every data row, so more preference pairs make another
    base model: a rerun keeping the old one would not be the run a new output_dir gives."""
    prepare_run(smoke_config(tmp_path))
    tokenizer = (tmp_path / "base" / "tokenizer.json").read_bytes()
    more_pairs = {"data.num_preferences": "150"}
    with raises_with("data.tokenizer_corpus_sha256", "--run.redo sft", exc=ConfigError):
        prepare_run(smoke_config(tmp_path, **more_pairs))
    prepare_run(smoke_config(tmp_path, **more_pairs, **{"run.redo": "sft"}))
    rebuilt = (tmp_path / "base" / "tokenizer.json").read_bytes()
    assert rebuilt != tokenizer
    prepare_run(smoke_config(tmp_path / "fresh", **more_pairs))
    assert (tmp_path / "fresh" / "base" / "tokenizer.json").read_bytes() == rebuilt


def test_outputs_without_a_record_are_refused(tmp_path):
    _finished_run(tmp_path)
    fingerprints.record_path(tmp_path, "sft").unlink()
    cfg = smoke_config(tmp_path)
    with raises_with("sft outputs but no record", "--run.redo sft", exc=ConfigError):
        phases.check_recorded_settings(tmp_path, _settings(cfg))


def test_redo_must_name_a_phase_the_run_runs(tmp_path, capsys):
    code, err = _rerun(tmp_path, capsys, "--phases", "ppo", "--run.redo", "sft")
    assert code == 2 and "run.redo" in err and "one of the phases this run runs (ppo)" in err


@pytest.mark.parametrize("damage", ["{not json", ""])
def test_a_damaged_record_is_named(tmp_path, damage):
    _finished_run(tmp_path)
    fingerprints.record_path(tmp_path, "reward").write_text(damage)
    cfg = smoke_config(tmp_path)
    with raises_with("reward.json", "cannot be read", exc=ConfigError):
        phases.check_recorded_settings(tmp_path, _settings(cfg))


def test_a_redo_that_cannot_start_deletes_nothing(local_ray, tmp_path, capsys):
    """Outputs are deleted only once every check has passed, Ray's resources included."""
    _finished_run(tmp_path)
    code, err = _rerun(tmp_path, capsys, "--run.redo", "reward", "--resources.learner_cpus", "64")
    assert code == 2 and "the PPO learner asks for CPU=64" in err
    assert (phase_dir(tmp_path, "reward") / "metrics.json").is_file()
    assert fingerprints.record_path(tmp_path, "reward").is_file()


@pytest.mark.parametrize(
    ("key", "then", "now", "phase"),
    [
        ("sft.weight_decay", 0.0, "0.1", "sft"),
        ("reward.weight_decay", 0.01, "0.0", "reward"),
        ("ppo.weight_decay", 0.01, "0.0", "ppo"),
    ],
)
def test_a_changed_weight_decay_is_refused(tmp_path, key, then, now, phase):
    """AdamW's weight decay changes what every phase learns (defaults: 0 for SFT, 0.01 for
    the reward model and PPO, torch's AdamW default, as before they were settings)."""
    _finished_run(tmp_path)
    cfg = smoke_config(tmp_path, **{key: now})
    with raises_with(
        f"its {phase} outputs", f"{key}: {then} then, {float(now)} now", exc=ConfigError
    ):
        phases.check_recorded_settings(tmp_path, _settings(cfg))


@pytest.mark.parametrize(
    ("made_with", "now", "change"),
    [
        # GPU generators under auto may sample with vLLM; hf is another sampler
        ({"resources.rollout_gpus": "1"}, {"rollout.engine": "hf"}, "'auto' then, 'hf' now"),
        # more threads split the learner's reductions into other partial sums
        ({}, {"resources.learner_threads": "2"}, "learner_threads: 1 then, 2 now"),
        (
            {"resources.learner_threads": "2"},
            {"resources.learner_threads": "0"},  # as many as learner_cpus 0.25: one
            "learner_threads: 2 then, 1 now",
        ),
    ],
)
def test_a_changed_sampler_or_learner_thread_count_is_refused(tmp_path, made_with, now, change):
    _finished_run(tmp_path, **made_with)
    cfg = smoke_config(tmp_path, **{**made_with, **now})
    with raises_with("its ppo outputs", change, exc=ConfigError):
        phases.check_recorded_settings(tmp_path, _settings(cfg))


@pytest.mark.parametrize(
    "now",
    [
        {"rollout.engine": "hf"},  # auto on CPU generators is hf
        {"resources.learner_threads": "1"},  # 0 with learner_cpus 0.25: one thread
        {"resources.learner_cpus": "1.5"},  # still one whole CPU, one thread
    ],
)
def test_the_same_sampler_and_learner_thread_count_said_otherwise_is_accepted(tmp_path, now):
    _finished_run(tmp_path)
    settings = _settings(smoke_config(tmp_path, **now))
    assert settings["ppo"] == fingerprints.read_record(tmp_path, "ppo")  # the same fingerprint
    phases.check_recorded_settings(tmp_path, settings)  # so the resume is not refused


def test_the_embedded_model_shape_counts_only_for_the_embedded_model(tmp_path):
    """model.hidden_size and the like build the embedded model; a hub model or directory has
    its own shape, so changing them there changes nothing."""
    data_dir = prepare_run(smoke_config(tmp_path)).data_dir
    hub = {"model.name_or_path": str(tmp_path / "a-hub-model")}
    made = fingerprints.phase_settings(smoke_config(tmp_path, **hub), data_dir)
    assert "model.hidden_size" not in made["sft"] and "model.name_or_path" in made["sft"]
    for phase in ("sft", "reward", "ppo"):
        fingerprints.write_record(tmp_path, phase, made[phase])
    reshaped = {"model.hidden_size": "64", "model.num_layers": "3", "model.vocab_size": "400"}
    now = fingerprints.phase_settings(smoke_config(tmp_path, **hub, **reshaped), data_dir)
    for phase in ("sft", "reward", "ppo"):
        fingerprints.check_against_record(tmp_path, phase, now[phase], redo="sft")
    embedded = fingerprints.phase_settings(smoke_config(tmp_path, **reshaped), data_dir)
    assert embedded["sft"]["model.hidden_size"] == 64


@pytest.mark.parametrize(("threads", "cpus", "expected"), [(0, 0.25, 1), (0, 2.5, 2), (3, 1.0, 3)])
def test_the_recorded_learner_threads_are_those_the_learner_runs_with(
    tmp_path, threads, cpus, expected
):
    overrides = {"resources.learner_threads": str(threads), "resources.learner_cpus": str(cpus)}
    cfg = smoke_config(tmp_path, **overrides)
    assert cfg.resources.learner_torch_threads == expected
    assert max(1, int(roles.policy_settings(cfg, tmp_path).cpus)) == expected  # use_cpus's rule


def test_a_setting_added_after_the_phase_ran_counts_only_when_not_at_its_default(tmp_path):
    """A record written before ppo.target_kl existed lacks it: a run at its default continues,
    one that sets it is refused naming it (the earlier run trained without an early stop)."""
    data_dir = prepare_run(smoke_config(tmp_path)).data_dir
    made = fingerprints.phase_settings(smoke_config(tmp_path), data_dir)["ppo"]
    older = {k: v for k, v in made.items() if k != "ppo.target_kl"}
    fingerprints.write_record(tmp_path, "ppo", older)
    fingerprints.check_against_record(tmp_path, "ppo", made, redo="ppo")
    early_stop = smoke_config(tmp_path, **{"ppo.target_kl": "0.05"})
    now = fingerprints.phase_settings(early_stop, data_dir)["ppo"]
    with pytest.raises(ConfigError, match=r"ppo.target_kl: '\(unset\)' then, 0.05 now"):
        fingerprints.check_against_record(tmp_path, "ppo", now, redo="ppo")
