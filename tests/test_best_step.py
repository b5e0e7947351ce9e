"""Tier 1: evaluation during PPO, which steps it runs at and which step becomes `policy/`,
worked by hand."""

from __future__ import annotations

import math

import pytest

from rlhf_ray.run.best_step import (
    BestStep,
    eval_due,
    eval_steps,
    selection_judge,
    staged_dir,
    stale_staged,
)


def test_eval_every_8_of_64_steps_evaluates_8_steps_the_last_among_them():
    assert eval_steps(8, 64) == [8, 16, 24, 32, 40, 48, 56, 64]


def test_eval_every_that_does_not_divide_the_steps_also_evaluates_the_last_step():
    # 10 steps, every 4: steps 4 and 8, and 10 because it is the last
    assert eval_steps(4, 10) == [4, 8, 10]
    assert eval_due(10, 4, 10) and not eval_due(9, 4, 10)


def test_eval_every_larger_than_the_run_evaluates_the_last_step_only():
    assert eval_steps(16, 2) == [2]


def test_eval_every_0_evaluates_nothing():
    assert eval_steps(0, 64) == []


def _best_of(scores: dict[int, float]) -> BestStep:
    best = BestStep()
    for step, score in scores.items():
        best.offer(step, score, kl=step / 10)
    return best


def test_the_best_step_is_the_highest_score_not_the_last():
    # steps 4, 8, 12, 16 at 0.1, 0.5, 0.3, 0.4: step 8 is best, its KL kept with it
    best = _best_of({4: 0.1, 8: 0.5, 12: 0.3, 16: 0.4})
    assert (best.step, best.score, best.kl) == (8, 0.5, 0.8)


def test_a_tie_keeps_the_earlier_step():
    # 0.2 at steps 2 and 6 (and nothing higher): step 2, nearer the reference, stays
    best = _best_of({2: 0.2, 4: -0.1, 6: 0.2})
    assert best.step == 2


def test_offer_says_whether_the_step_is_the_new_best():
    best = BestStep()
    assert best.offer(1, -0.5)  # the first evaluated step is the best so far
    assert not best.offer(2, -0.5)  # a tie
    assert not best.offer(3, -0.7)
    assert best.offer(4, -0.4)
    assert best.step == 4


def test_a_score_that_is_not_a_number_never_wins():
    best = _best_of({1: 0.3, 2: math.nan})
    assert best.step == 1
    assert not BestStep().offer(1, math.nan)


def test_resume_continues_from_the_best_so_far_in_the_checkpoint():
    # a run evaluated steps 1..3 (best: step 2), checkpointed, was stopped; the resumed run
    # evaluates steps 4 and 5: step 4's 0.25 does not beat step 2's 0.3, step 5's 0.35 does
    before = _best_of({1: 0.1, 2: 0.3, 3: 0.2})
    state = before.state()
    resumed = BestStep.from_state(state)
    assert resumed == before
    assert not resumed.offer(4, 0.25)
    assert resumed.offer(5, 0.35, judge="gold_judge")
    assert resumed.state() == {"step": 5, "score": 0.35, "kl": None, "judge": "gold_judge"}
    # the same scores seen without a stop give the same best
    assert _best_of({1: 0.1, 2: 0.3, 3: 0.2, 4: 0.25, 5: 0.35}).step == 5


def test_a_checkpoint_without_a_best_step_resumes_with_none():
    assert BestStep.from_state(None) == BestStep()


def test_the_gold_judge_ranks_steps_where_it_scores_else_the_reward_model_else_the_total():
    assert selection_judge({"gold_judge": 0.1, "reward_model": 2.0, "total": 2.0}) == "gold_judge"
    assert selection_judge({"reward_model": 2.0, "total": 2.0, "m:f": 1.0}) == "reward_model"
    assert selection_judge({"m:f": 1.0, "total": 0.5}) == "total"
    with pytest.raises(ValueError, match="gold_judge"):
        selection_judge({"kl": 1.0})


def test_stale_staged_exports_are_those_of_other_steps_than_the_best(tmp_path):
    for step in (3, 5, 7):
        staged_dir(tmp_path, step).mkdir(parents=True)
    # the checkpoint's best is step 3; steps 5 and 7 were exported after it by a stopped run
    assert [p.name for p in stale_staged(tmp_path, BestStep(step=3))] == ["step-5", "step-7"]
    assert len(stale_staged(tmp_path, BestStep())) == 3  # no best: none is kept
    assert stale_staged(tmp_path / "elsewhere", BestStep()) == []


# --- the judges of users' data (eval.judges), rlhf_ray/run/judges.py ----------------------------


def test_judge_summary_gives_each_models_mean_and_the_policys_win_rate_vs_sft():
    from rlhf_ray.run.judges import judge_summary

    # 2 prompts x 2 samples. reward model: policy beats SFT on 3 pairs, ties 1 -> 3.5 / 4
    # my:fn: policy loses 2, wins 1, ties 1 -> 1.5 / 4
    scores = {
        "reward_model": {
            "base": [[0.0, 1.0], [2.0, -1.0]],  # mean 0.5
            "sft": [[1.0, 1.0], [0.0, 0.0]],  # mean 0.5
            "policy": [[2.0, 1.0], [1.0, 0.5]],  # mean 1.125
        },
        "my:fn": {
            "sft": [[1.0, 2.0], [3.0, 4.0]],  # mean 2.5
            "policy": [[0.0, 3.0], [3.0, 1.0]],  # mean 1.75
        },
    }
    assert judge_summary(scores) == {
        "reward_model_reward_base": 0.5,
        "reward_model_reward_sft": 0.5,
        "reward_model_reward_policy": 1.125,
        "reward_model_win_rate_vs_sft": 0.875,
        "my:fn_reward_sft": 2.5,
        "my:fn_reward_policy": 1.75,
        "my:fn_win_rate_vs_sft": 0.375,
    }


def test_judge_summary_without_a_policy_has_no_win_rate():
    from rlhf_ray.run.judges import judge_summary

    assert judge_summary({"reward_model": {"sft": [[1.0], [2.0]]}}) == {
        "reward_model_reward_sft": 1.5
    }


def test_judges_of_leaves_the_reward_model_out_of_a_run_without_one_and_says_so(tmp_path):
    from rlhf_ray.config.command_line import parse_run_args
    from rlhf_ray.run.judges import judges_of, trained_on
    from tests.conftest import smoke_config

    cfg = smoke_config(tmp_path)
    assert judges_of(cfg) == (("reward_model",), None)
    assert trained_on(cfg, "reward_model")
    fn = "tests.reward_functions_for_tests:length"
    no_rm = parse_run_args(
        ["--config", "smoke", "--run.output_dir", str(tmp_path)]
        + ["--scoring.reward_model_weight", "0", "--scoring.functions", fn]
        + ["--eval.judges", "reward_model", fn]
    )
    judges, note = judges_of(no_rm)
    assert judges == (fn,) and "no reward model" in note
    # `--phases sft`: the SFT model is evaluated before any reward model is trained
    judges, note = judges_of(cfg, tmp_path / "reward")
    assert judges == () and f"no trained reward model in {tmp_path / 'reward'}" in note
    assert trained_on(no_rm, fn) and not trained_on(cfg, "a:b")


def test_a_judge_that_cannot_be_called_is_refused_naming_eval_judges():
    from rlhf_ray.errors import ConfigError
    from rlhf_ray.run.judges import check_judges
    from tests.conftest import raises_with

    check_judges(("reward_model", "tests.reward_functions_for_tests:words"))
    with raises_with("eval.judges:", "no_such_module", exc=ConfigError):
        check_judges(("no_such_module:f",))
    with raises_with("eval.judges:", "not a function", exc=ConfigError):
        check_judges(("tests.reward_functions_for_tests:NOT_A_FUNCTION",))


def test_eval_judges_must_be_reward_model_or_module_function(tmp_path):
    from rlhf_ray.config.command_line import parse_run_args
    from rlhf_ray.errors import ConfigError
    from tests.conftest import raises_with

    argv = ["--config", "smoke", "--run.output_dir", str(tmp_path), "--eval.judges"]
    with raises_with("eval.judges", "module:function", exc=ConfigError):
        parse_run_args([*argv, "gold"])
    with raises_with("eval.judges", "no judge twice", exc=ConfigError):
        parse_run_args([*argv, "reward_model", "reward_model"])
