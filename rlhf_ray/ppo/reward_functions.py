"""Rewards from code: functions named `module:function`, with TRL's `reward_funcs` signature.

    def my_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]: ...

A function receives a whole step's raw prompts (as the data gave them, before the prompt
template; a prompt appears once per sample) and decoded completions, and returns one number per
completion. A function that takes `**kwargs` or a `completion_ids` parameter also gets the
completions' token ids. Whatever goes wrong is reported with the function's name: an import
that fails (checked before any phase runs), an exception, a wrong length, or a value that is
not a finite number (with the prompt it was for). Nothing becomes a silent zero.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import os
import sys
from collections.abc import Callable

import torch

from rlhf_ray.errors import ConfigError, UserInputError


class RewardFunctionError(UserInputError):
    """A reward function raised or returned something other than one finite number each."""


def import_reward_function(spec: str) -> Callable:
    """The function `module:function` names; ConfigError naming it if it cannot be had.

    The working directory is searched too (as `python -m` does), so a module next to where the
    run starts is found; under `ray job submit --working-dir` every worker starts there."""
    module_name, _, name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any error a module raises while importing is the user's to see
        raise ConfigError(
            f"scoring.functions: {spec!r} cannot be imported: {type(err).__name__}: {err}"
        ) from None
    function = getattr(module, name, None)
    if function is None:
        raise ConfigError(f"scoring.functions: {spec!r}: module {module_name} has no {name!r}")
    if not callable(function):
        raise ConfigError(
            f"scoring.functions: {spec!r} is a {type(function).__name__}, not a function"
        )
    _check_takes_the_call(spec, function)
    return function


def _check_takes_the_call(spec: str, function: Callable) -> None:
    """The function can be called as `call_reward_function` calls it, by keyword: found now
    rather than as a TypeError in the first PPO step, after SFT and the reward model."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some builtins have no signature: found when called
        return
    try:
        signature.bind(prompts=[], completions=[])
    except TypeError as err:
        raise ConfigError(
            f"scoring.functions: {spec!r} has the signature {signature}, which cannot take the "
            f"reward call ({err}); expected f(prompts=[...], completions=[...], **kwargs) -> "
            "one float per completion (TRL's reward_funcs)"
        ) from None


def call_reward_function(
    spec: str,
    function: Callable,
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]],
) -> torch.Tensor:
    """-> (B,) float32: the function's value for each completion, checked."""
    extra = {"completion_ids": completion_ids} if _takes_completion_ids(function) else {}
    try:
        values = function(prompts=prompts, completions=completions, **extra)
    except Exception as err:
        raise RewardFunctionError(
            f"reward function {spec} raised {type(err).__name__}: {err} (called with "
            f"{len(prompts)} completions; the first prompt: {prompts[0]!r})"
        ) from err
    if isinstance(values, torch.Tensor) and values.dim() == 1:
        values = values.tolist()
    if isinstance(values, str | bytes) or not hasattr(values, "__len__"):
        raise RewardFunctionError(
            f"reward function {spec} returned a {type(values).__name__}; expected a list of "
            f"{len(prompts)} numbers, one per completion"
        )
    if len(values) != len(prompts):
        raise RewardFunctionError(
            f"reward function {spec} returned {len(values)} values for {len(prompts)} "
            "completions; expected one number per completion"
        )
    for value, prompt, completion in zip(values, prompts, completions, strict=True):
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardFunctionError(
                f"reward function {spec} returned {value!r} for the prompt {prompt!r} "
                f"(completion {completion!r}); expected a finite number"
            )
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def _takes_completion_ids(function: Callable) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: call with the two lists
        return False
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD or p.name == "completion_ids" for p in parameters
    )
