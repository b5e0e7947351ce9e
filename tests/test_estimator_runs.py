"""Critic-free estimators and reward functions through the real driver on a local Ray.

The SFT model is the untrained tiny one (`tiny_run`): these tests check the wiring (groups,
reward sources, skipped phases, errors), not what is learned; docs/estimators.md reports that.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from jobs import rlhf
from jobs.ppo.roles import create_roles
from rlhf_ray.data.tokenizer import load_tokenizer
from rlhf_ray.models.sampling import decode_responses
from rlhf_ray.run import metrics
from rlhf_ray.run.checkpoints import is_complete, read_metrics
from tests.conftest import copy_outputs, smoke_config

GOLD = "rlhf_ray.world.gold_judge:gold_reward"
TESTS = "tests.reward_functions_for_tests"
ORACLE = ["--scoring.reward_model_weight", "0", "--scoring.functions", GOLD]


def _run(out: Path, *args: str) -> int:
    return rlhf.main(
        ["--config", "smoke", "--output_dir", str(out), "--run.evaluate", "false", *args]
    )


@pytest.fixture
def sft_only(tiny_run, tmp_path) -> Path:
    """An output dir holding the tiny run's base and SFT models, and no reward model."""
    source, _ = tiny_run
    copy_outputs(source, tmp_path / "run", ("base", "sft"))
    return tmp_path / "run"


@pytest.mark.slow  # a driver through its phases
def test_grpo_oracle_run_skips_the_reward_phase_and_trains_on_the_gold_judge(
    local_ray, sft_only, capsys
):
    """k = 4 samples per prompt, 8 rollouts over 3 generators (rows 0-2, 3-5, 6-7): each group
    is split over two generators, and the learner still finds each whole (it refuses a step
    with an incomplete group)."""
    code = _run(
        sft_only,
        *ORACLE,
        *("--ppo.estimator", "grpo", "--ppo.samples_per_prompt", "4"),
        *("--ppo.num_rollout_actors", "3", "--resources.rollout_cpus", "0.1"),
        *("--ppo.lam", "0.9"),  # GAE's: named as unused, not silently dropped
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "[config] not used by this run: ppo.lam=0.9" in printed.out
    assert "[reward] skipped: scoring.reward_model_weight is 0" in printed.out
    assert not (sft_only / "reward").exists()
    assert is_complete(sft_only / "policy")
    final = read_metrics(sft_only / "policy")
    assert final["steps"] == 2
    assert (
        metrics.reward_source(GOLD) in final and metrics.reward_source("reward_model") not in final
    )
    # The gold judge scores in [-4, 1]; with no reward model the score is the gold reward alone
    # (minus the missing-EOS penalty of 1 for responses that hit the length limit).
    assert -5.0 <= final[metrics.SCORES] <= 1.0
    assert metrics.KL_LOSS in final and metrics.VALUE_LOSS not in final  # GRPO: KL in the loss


def test_a_reward_function_that_cannot_be_imported_stops_the_run_before_any_phase(tmp_path, capsys):
    code = _run(tmp_path / "run", "--scoring.functions", "tests.no_such_module:f")
    assert code == 2
    err = capsys.readouterr().err
    assert "scoring.functions: 'tests.no_such_module:f' cannot be imported" in err
    assert not (tmp_path / "run" / "sft").exists()


@pytest.mark.slow  # a driver through its phases
def test_a_bad_reward_value_names_function_and_prompt_at_the_first_step(
    local_ray, sft_only, capsys
):
    code = _run(
        sft_only,
        *("--scoring.reward_model_weight", "0", "--ppo.estimator", "rloo"),
        *("--ppo.samples_per_prompt", "2", "--scoring.functions", f"{TESTS}:none_for_the_second"),
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"reward function {TESTS}:none_for_the_second returned None for the prompt" in err
    assert "expected a finite number" in err
    assert "Traceback" not in err  # the user's message, not Ray's wrapping of it
    assert is_complete(sft_only / "sft") and not (sft_only / "policy").exists()


def test_weighted_sources_add_up_and_each_is_logged(local_ray, tiny_run, tmp_path):
    """The scorer's total is 0.5 * reward model + 2 * word count, per rollout."""
    source, _ = tiny_run
    out = tmp_path / "run"
    copy_outputs(source, out, ("base", "sft", "reward"))
    cfg = smoke_config(
        out,
        **{
            "scoring.reward_model_weight": "0.5",
            "scoring.functions": f"{TESTS}:length",
            "scoring.function_weights": "2.0",
        },
    )
    roles = create_roles(cfg, out)
    try:
        prompts = ["What is the capital of Peru?", "Give me a tip for sleeping."]
        batch, _ = roles.generators[0].generate.remote(prompts, [0, 1])
        scores = ray.get(roles.scorer.score.remote(batch), timeout=120)
    finally:
        roles.stop()
    assert set(scores.components) == {"reward_model", f"{TESTS}:length"}
    rm, words = scores.components["reward_model"], scores.components[f"{TESTS}:length"]
    texts = decode_responses(load_tokenizer(str(out / "sft")), ray.get(batch))
    assert words.tolist() == [float(len(text.split())) for text in texts]
    assert scores.total.tolist() == pytest.approx((0.5 * rm + 2.0 * words).tolist())
