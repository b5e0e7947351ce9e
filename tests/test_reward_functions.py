"""Rewards from code: importing `module:function`, calling it, and every way it can go wrong."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.errors import ConfigError
from rlhf_ray.ppo.reward_functions import (
    RewardFunctionError,
    call_reward_function,
    import_reward_function,
)
from rlhf_ray.world import assistant_world
from rlhf_ray.world.gold_judge import GoldJudge, gold_reward
from tests import reward_functions_for_tests as funcs
from tests.conftest import raises_with

MODULE = "tests.reward_functions_for_tests"
PROMPTS = ["What is the capital of Peru?", "Give me a tip for sleeping."]
COMPLETIONS = ["Lima.", "Keep a regular bedtime."]
IDS = [[5, 6], [7, 8, 9]]


def call(name: str) -> torch.Tensor:
    spec = f"{MODULE}:{name}"
    return call_reward_function(spec, import_reward_function(spec), PROMPTS, COMPLETIONS, IDS)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tests.no_such_module:f", "ModuleNotFoundError"),
        (f"{MODULE}:no_such_function", f"module {MODULE} has no 'no_such_function'"),
        (f"{MODULE}:NOT_A_FUNCTION", "is a int, not a function"),
    ],
)
def test_a_function_that_cannot_be_had_is_a_config_error_naming_it(spec, message):
    with raises_with("scoring.functions", spec.split(":")[0], message, exc=ConfigError):
        import_reward_function(spec)


def test_values_come_back_as_a_float_tensor_and_ids_only_when_asked_for():
    assert call("length").tolist() == [1.0, 4.0]
    assert funcs.length.saw_ids  # **kwargs: completion ids are passed along
    assert call("two_lists_only").tolist() == [1.0, 1.0]  # no **kwargs: called with two lists
    assert call("two_lists_only").dtype == torch.float32


def test_a_function_that_raises_is_named_with_the_first_prompt():
    with raises_with(
        f"reward function {MODULE}:raises raised ZeroDivisionError",
        "the verifier divided by zero",
        repr(PROMPTS[0]),
        exc=RewardFunctionError,
    ):
        call("raises")


def test_a_wrong_length_is_named():
    with raises_with(f"{MODULE}:one_short returned 1 values for 2", exc=RewardFunctionError):
        call("one_short")
    with raises_with(f"{MODULE}:a_string returned a str", exc=RewardFunctionError):
        call("a_string")


@pytest.mark.parametrize(
    "name, value, prompt",
    [("none_for_the_second", "None", PROMPTS[1]), ("nan_for_the_first", "nan", PROMPTS[0])],
)
def test_a_value_that_is_not_a_finite_number_is_named_with_its_prompt(name, value, prompt):
    with raises_with(
        f"{MODULE}:{name} returned {value} for the prompt {prompt!r}",
        "expected a finite number",
        exc=RewardFunctionError,
    ):
        call(name)


def test_the_gold_judge_as_a_reward_function_scores_as_the_judge_does():
    specs = list(assistant_world.all_prompts())[:20]
    prompts = [s.text for s in specs]
    completions = [assistant_world.ideal_response(s) for s in specs[:10]] + ["whatever"] * 10
    judge = GoldJudge()
    expected = [judge.score(p, c).total for p, c in zip(prompts, completions, strict=True)]
    assert gold_reward(prompts=prompts, completions=completions) == expected
    assert expected[:10] == [1.0] * 10 and max(expected[10:]) < 1.0


def test_the_gold_judge_names_a_prompt_it_does_not_know():
    spec = "rlhf_ray.world.gold_judge:gold_reward"
    with raises_with(
        f"reward function {spec} raised KeyError",
        "only knows synthetic-world prompts",
        "'Write me a poem.'",
        exc=RewardFunctionError,
    ):
        call_reward_function(spec, gold_reward, ["Write me a poem."], ["No."], [[1]])
