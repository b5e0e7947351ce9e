"""Read user data rows from files, `datasets` saves or dataset ids, and reject bad ones early.

Row formats follow TRL's conventions (DESIGN.md section 5), standard (text) and conversational
(message lists):
  SFT          {"prompt", "completion"}  or  {"messages"} (the last message is the completion)
  preferences  {"prompt", "chosen", "rejected"}  or  {"chosen", "rejected"} as two whole
               conversations sharing their first messages (an implicit prompt, HH-RLHF's shape)
  RL prompts   {"prompt"}
A file holds one format; a row that fits two, or a row unlike the file's first, is refused,
never guessed. Every problem raises `DataError` naming the config option, the file, the line or
row, the field, and what was expected, so a user can fix the file without reading this code.
Nothing here loads a model or touches Ray: it runs before either, so bad input costs seconds.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any

from rlhf_ray.data import chat, sources
from rlhf_ray.errors import DataError

SFT_FIELDS = ("prompt", "completion")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
PROMPT_FIELDS = ("prompt",)
# The other column sets a kind may come as (conversational only), beside its fields.
_ALTERNATIVES = {SFT_FIELDS: ("messages",), PREFERENCE_FIELDS: ("chosen", "rejected")}
_EXPECTED_VALUE = "a non-empty string or a message list"
MAX_FIELD_CHARS = 1_000_000  # longer texts are a data bug: every row is cut to a few tokens


@dataclass(frozen=True)
class LoadedRows:
    rows: list[dict]  # only the fields of the kind (prompt, ...), in source order
    source: str  # the path or dataset id it came from
    ignored_fields: tuple[str, ...]  # extra columns in the file, not used (reported, not hidden)
    format: str  # "text", "conversational", "conversational messages" or "... implicit prompt"

    @property
    def conversational(self) -> bool:
        return self.format != "text"


def load_rows(path: str, fields: tuple[str, ...], option: str) -> LoadedRows:
    """Load and validate rows of the kind `fields` names (SFT_FIELDS, PREFERENCE_FIELDS or
    PROMPT_FIELDS). `option` is the config key that named the path, for error messages."""
    records = sources.read_records(path, option)
    if records.columns is not None:
        _check_columns(records.columns, fields, f"{option}: {path}")
    rows, extra, first = [], set(), None
    for where, record in records.items:
        row, row_format, used = _normalise(record, fields, where)
        if first is None:
            first = (row_format, where)
        elif row_format != first[0]:
            raise DataError(
                f"{where}: a {row_format} row, but {first[1]} is {first[0]}; expected one "
                "format in a file"
            )
        rows.append(row)
        extra.update(k for k in record if k not in used)
    if not rows:
        wanted = _format_names(fields)
        raise DataError(f"{option}: {path} has no rows; expected at least one row with {wanted}")
    return LoadedRows(rows, str(path), tuple(sorted(extra)), first[0])


def _format_names(fields: tuple[str, ...]) -> str:
    names = " or ".join(", ".join(c) for c in (fields, _ALTERNATIVES.get(fields)) if c)
    return names


def _check_columns(columns: tuple[str, ...], fields: tuple[str, ...], where: str) -> None:
    """A table must have the columns of one of the kind's formats."""
    options = [c for c in (fields, _ALTERNATIVES.get(fields)) if c]
    if any(set(c) <= set(columns) for c in options):
        return
    missing = [name for name in fields if name not in columns]
    raise DataError(
        f"{where}: missing column(s) {', '.join(missing)} (columns present: "
        f"{', '.join(columns)}); expected columns {_format_names(fields)}"
    )


# --- one row -------------------------------------------------------------------------------------


def _has(record: dict, key: str) -> bool:
    # Tables put a null in a column a row does not have: null counts as absent in a choice.
    return record.get(key) is not None


def _normalise(record: dict, fields: tuple[str, ...], where: str) -> tuple[dict, str, set]:
    """(the row in the kind's fields, its format, the record keys it used)."""
    if fields == SFT_FIELDS and _has(record, "messages"):
        if _has(record, "prompt") or _has(record, "completion"):
            raise DataError(
                f"{where}: has 'messages' and 'prompt'/'completion'; expected one format: "
                "{messages} or {prompt, completion}"
            )
        return _from_messages(record["messages"], where), "conversational messages", {"messages"}
    implicit = not _has(record, "prompt") and _has(record, "chosen") and _has(record, "rejected")
    if fields == PREFERENCE_FIELDS and implicit:
        row = _implicit_pair(record, where)
        return row, "conversational implicit prompt", {"chosen", "rejected"}
    values = {name: _field(record, name, where) for name in fields}
    kinds = {name: chat.is_conversational(v) for name, v in values.items()}
    if len(set(kinds.values())) > 1:
        text = [n for n, conv in kinds.items() if not conv]
        lists = [n for n, conv in kinds.items() if conv]
        raise DataError(
            f"{where}: field {lists[0]!r} is a array (message list) but {text[0]!r} is a "
            "string; expected both text (a non-empty string) or both message lists"
        )
    if any(kinds.values()):
        row = _conversational_row(values, where)
        row_format = "conversational"
    else:
        row = {name: _text(value, f"{where}: field {name!r}") for name, value in values.items()}
        row_format = "text"
    _check_pair_differs(row, where)
    return row, row_format, set(fields)


def _field(record: dict, name: str, where: str) -> Any:
    if name not in record:
        present = ", ".join(sorted(record)) or "(none)"
        raise DataError(
            f"{where}: field {name!r} is missing (keys present: {present}); "
            f"expected {_EXPECTED_VALUE}"
        )
    value = record[name]
    if not isinstance(value, (str, list)):
        raise DataError(
            f"{where}: field {name!r} is a {sources.json_type(value)}; expected {_EXPECTED_VALUE}"
        )
    return value


def _messages(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(
            f"{where} is a {sources.json_type(value)}; expected a message list (this format "
            "is conversational)"
        )
    return chat.check_messages(value, where, _check_text)


def _conversational_row(values: dict, where: str) -> dict:
    row = {}
    for name, value in values.items():
        here = f"{where}: field {name!r}"
        messages = _messages(value, here)
        if name == "prompt":
            chat.check_prompt_messages(messages, here)
        else:
            chat.check_completion_messages(messages, here)
        row[name] = messages
    return row


def _from_messages(value: Any, where: str) -> dict:
    """{"messages": [...]} -> prompt (all but the last message) and completion (the last)."""
    messages = _messages(value, f"{where}: field 'messages'")
    here = f"{where}: field 'messages'"
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{here}: the last message is not an assistant's; expected it to be")
    if len(messages) < 2:
        raise DataError(f"{here}: only the assistant's message; expected a prompt before it")
    chat.check_prompt_messages(messages[:-1], f"{here}: the messages before the last")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def _implicit_pair(record: dict, where: str) -> dict:
    if isinstance(record["chosen"], str) or isinstance(record["rejected"], str):
        raise DataError(
            f"{where}: text 'chosen' and 'rejected' without a 'prompt' field; expected a "
            "'prompt' field (an implicit prompt is read from message lists only: where a text "
            "prompt ends would be a guess)"
        )
    chosen = _messages(record["chosen"], f"{where}: field 'chosen'")
    rejected = _messages(record["rejected"], f"{where}: field 'rejected'")
    prompt, chosen, rejected = chat.split_implicit_prompt(chosen, rejected, where)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _text(value: str, where: str) -> str:
    _check_text(value, where)
    return value  # kept exactly: leading spaces matter to tokenizers


def _check_pair_differs(row: dict, where: str) -> None:
    if "chosen" not in row:
        return
    same = (
        row["chosen"].strip() == row["rejected"].strip()
        if isinstance(row["chosen"], str)
        else row["chosen"] == row["rejected"]
    )
    if same:
        # A pair with nothing to prefer teaches the reward model nothing and hides a data bug.
        raise DataError(
            f"{where}: fields 'chosen' and 'rejected' are identical; expected two different "
            "responses"
        )


# --- text ----------------------------------------------------------------------------------------


def _check_text(value: str, where: str) -> None:
    """Text every phase can use: some visible character, encodable, of a sane length."""
    if not any(_is_visible(ch) for ch in value):
        raise DataError(
            f"{where} is empty or only whitespace or invisible characters; "
            f"expected {_EXPECTED_VALUE}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800", which JSON allows
        raise DataError(
            f"{where} holds {value[e.start]!r} at character {e.start + 1}, half of a UTF-16 "
            "pair that no text encoding can write; expected text"
        ) from e
    if len(value) > MAX_FIELD_CHARS:
        raise DataError(
            f"{where} has {len(value):,} characters, more than {MAX_FIELD_CHARS:,}; rows are cut "
            "to data.max_prompt_tokens and data.max_completion_tokens tokens anyway, so shorten "
            "it (a whole file on one line?)"
        )


def _is_visible(ch: str) -> bool:
    # Whitespace, controls, format characters (zero-width space, BOM, joiners) show nothing.
    return not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf", "Cn", "Co", "Zs")
