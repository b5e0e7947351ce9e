"""Reward functions that tests name as `tests.reward_functions_for_tests:<name>`."""

NOT_A_FUNCTION = 3


def length(prompts, completions, **kwargs):
    """Words in each completion; records whether token ids came along."""
    length.saw_ids = "completion_ids" in kwargs
    return [float(len(c.split())) for c in completions]


def words(prompts, completions, **kwargs):
    """Words in each completion, text or an assistant message list (an eval.judges judge)."""
    return [
        float(len((c[-1]["content"] if isinstance(c, list) else c).split())) for c in completions
    ]


def two_lists_only(prompts, completions):
    return [1] * len(completions)  # ints are numbers too


def raises(prompts, completions, **kwargs):
    raise ZeroDivisionError("the verifier divided by zero")


def one_short(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def none_for_the_second(prompts, completions, **kwargs):
    return [0.0 if i != 1 else None for i in range(len(completions))]


def nan_for_the_first(prompts, completions, **kwargs):
    return [float("nan")] + [0.0] * (len(completions) - 1)


def a_string(prompts, completions, **kwargs):
    return "1.0"
