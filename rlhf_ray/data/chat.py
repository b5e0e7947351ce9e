"""Conversational rows (TRL's formats): message lists, their checks, and how they become tokens.

A message is `{"role": "system" | "user" | "assistant", "content": str}` (other keys, such as a
tool call's name, pass through to the chat template unchanged). A conversational prompt is a
message list the model answers next (it does not end with an assistant message); a
conversational completion is one assistant message in a list. Text is rendered with the
tokenizer's chat template (or `data.chat_template`), and a completion's ids are what the
template adds after the prompt's generation cue, cut after the first EOS: generation stops at
EOS, so the reward model must be trained to read its score there too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from rlhf_ray.errors import ConfigError, DataError

Message = dict[str, Any]
Prompt = str | list[Message]  # text, or a message list
ROLES = ("system", "user", "assistant")

# The embedded model's template: the text the default `data.prompt_template` gives a text row
# ("<s>User: {prompt}\nAssistant:" + " {completion}</s>"), extended to system messages and many
# turns. Saved with every model directory, so the models apply it outside rlhf-ray too.
EMBEDDED_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def read_template(value: str | None) -> str | None:
    """`data.chat_template` as Jinja text: the file it names, or the template written inline."""
    if value is None:
        return None
    if "{{" in value or "{%" in value:
        return _compiled(value, value)
    try:
        text = Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"data.chat_template={value!r} cannot be read ({err}); expected a Jinja template "
            "file, or the template itself"
        ) from err
    return _compiled(text, value)


def _compiled(template: str, value: str) -> str:
    """`template`, once Jinja has compiled it as transformers does (with its extensions): a
    syntax error is named for the setting and line before any row is rendered (before: it was
    blamed on the first conversational row)."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as err:
        shown = value if len(value) <= 80 else f"{value[:77]}..."
        raise ConfigError(
            f"data.chat_template={shown!r}: not a Jinja template: {err.message} (line "
            f"{err.lineno}); expected a chat template such as a tokenizer's chat_template"
        ) from err
    return template


def is_conversational(value: Any) -> bool:
    return isinstance(value, list)


def user_message(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def assistant_message(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


def prompt_text(prompt: Prompt) -> str:
    """The words a judge reads: the text itself, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def response_text(response: Prompt) -> str:
    """A response's words: the text itself, or the (one) assistant message's content."""
    return response if isinstance(response, str) else response[-1]["content"]


def message_texts(value: Prompt) -> list[str]:
    """Every piece of text in a field (for training the embedded tokenizer)."""
    return [value] if isinstance(value, str) else [m["content"] for m in value]


# --- checks ------------------------------------------------------------------------------------


def check_messages(value: Any, where: str, check_text) -> list[Message]:
    """A non-empty list of messages with known roles and text content; keys other than role and
    content are kept (None values, which columnar formats add for absent keys, are dropped)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: an empty message list; expected at least one message")
    messages = []
    for i, message in enumerate(value):
        here = f"{where}, message {i}"
        if not isinstance(message, dict):
            raise DataError(
                f"{here}: a {type(message).__name__}; expected an object with role and content"
            )
        message = {k: v for k, v in message.items() if v is not None}
        for key in ("role", "content"):
            if key not in message:
                present = ", ".join(sorted(message)) or "(none)"
                raise DataError(f"{here}: key {key!r} is missing (keys present: {present})")
        if message["role"] not in ROLES:
            raise DataError(f"{here}: role {message['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(
                f"{here}: content is a {type(message['content']).__name__}; expected text "
                "(content parts such as images are not supported)"
            )
        check_text(message["content"], f"{here}: content")
        messages.append(message)
    return messages


def check_prompt_messages(messages: list[Message], where: str) -> None:
    if messages[-1]["role"] == "assistant":
        raise DataError(
            f"{where}: ends with an assistant message; expected a prompt the model answers next "
            "(ending with a user or system message)"
        )
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: has no user message; expected at least one")


def check_completion_messages(messages: list[Message], where: str) -> None:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in messages)
        raise DataError(
            f"{where}: messages with roles [{roles}]; expected exactly one assistant message"
        )


def split_implicit_prompt(
    chosen: list[Message], rejected: list[Message], where: str
) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt, chosen, rejected) of a pair given as two whole conversations: the prompt is the
    messages they share from the start (as TRL's `extract_prompt` splits HH-RLHF)."""
    if chosen == rejected:
        raise DataError(
            f"{where}: fields 'chosen' and 'rejected' are identical; expected two different "
            "responses"
        )
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError(
            f"{where}: 'chosen' and 'rejected' share no first message; expected two "
            "conversations that start with the same prompt (or give a 'prompt' field)"
        )
    prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    check_prompt_messages(prompt, f"{where}: the shared prompt")
    for name, rest in (("chosen", chosen), ("rejected", rejected)):
        if not rest:
            raise DataError(
                f"{where}: '{name}' has nothing after the shared prompt; expected a response"
            )
        check_completion_messages(rest, f"{where}: '{name}' after the shared prompt")
    return prompt, chosen, rejected


# --- tokens ------------------------------------------------------------------------------------


def render(tok: PreTrainedTokenizerBase, messages: list[Message], template: str | None, cue: bool):
    """Token ids of `messages` through the chat template (`cue`: end with the assistant's
    generation prompt), as `apply_chat_template(tokenize=True)` gives them."""
    try:
        text = tok.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=cue, tokenize=False
        )
    except Exception as err:  # noqa: BLE001 - Jinja raises many kinds; the template's own words
        raise DataError(f"the chat template cannot format this conversation: {err}") from err
    return tok.encode(text, add_special_tokens=False)


def chat_prompt_ids(tok, prompt: list[Message], template: str | None) -> list[int]:
    return render(tok, prompt, template, cue=True)


def chat_completion_ids(
    tok, prompt: list[Message], completion: list[Message], template: str | None
) -> list[int]:
    """What the template adds to the prompt (with its cue) for `completion`, up to and with the
    first EOS (EOS appended where the template ends a turn without one)."""
    head = render(tok, prompt, template, cue=True)
    whole = render(tok, prompt + completion, template, cue=False)
    if whole[: len(head)] != head:
        raise DataError(
            "the chat template renders the prompt differently once a response follows it, so "
            "the response's tokens cannot be told apart; use a template that only appends "
            "(data.chat_template)"
        )
    ids = whole[len(head) :]
    if tok.eos_token_id in ids:
        return ids[: ids.index(tok.eos_token_id) + 1]
    return [*ids, tok.eos_token_id]
