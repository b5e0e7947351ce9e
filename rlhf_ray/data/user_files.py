"""Read user data rows from JSONL files or `datasets` directories, and reject bad ones early.

Row formats follow TRL's conventions (DESIGN.md section 5). Every problem raises `DataError`
naming the config option, the file, the line (JSONL, 1-based, as editors count) or the row
(datasets directory, 0-based, as `dataset[i]` counts), the field, and what was expected, so a
user can fix the file without reading this code. Nothing here loads a model or touches Ray:
it runs before either, so bad input costs seconds, not a cluster start.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from rlhf_ray.errors import DataError

SFT_FIELDS = ("prompt", "completion")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
PROMPT_FIELDS = ("prompt",)

# Files a `save_to_disk` directory always holds: a Dataset writes the first two, a
# DatasetDict writes the third. Checking for them first gives a clear message for a wrong
# directory instead of whatever `load_from_disk` happens to raise.
_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_EXPECTED_SOURCE = "a JSONL file or a directory written by datasets' save_to_disk"
_EXPECTED_VALUE = "a non-empty string"
MAX_FIELD_CHARS = 1_000_000  # longer texts are a data bug: every row is cut to a few tokens


@dataclass(frozen=True)
class LoadedRows:
    rows: list[dict[str, str]]  # only the required fields, in file order
    source: str  # the path it came from
    ignored_fields: tuple[str, ...]  # extra columns in the file, not used (reported, not hidden)


def load_rows(path: str, fields: tuple[str, ...], option: str) -> LoadedRows:
    """Load and validate rows from a JSONL file or a `datasets` directory saved with save_to_disk.
    `option` is the config key that named the path (e.g. "data.sft_path"), used in error messages.
    """
    p = Path(path)
    if p.is_dir():
        rows, extra = _read_datasets_dir(p, fields, option)
    elif p.exists():
        rows, extra = _read_jsonl(p, fields, option)
    else:
        raise DataError(f"{option}: {path} does not exist; expected {_EXPECTED_SOURCE}")
    if not rows:
        wanted = ", ".join(fields)
        raise DataError(f"{option}: {path} has no rows; expected at least one row with {wanted}")
    return LoadedRows(rows=rows, source=str(path), ignored_fields=tuple(sorted(extra)))


# --- JSONL -----------------------------------------------------------------------------------


def _read_jsonl(path: Path, fields: tuple[str, ...], option: str) -> tuple[list, set[str]]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(
            f"{option}: {path} cannot be read ({e}); expected {_EXPECTED_SOURCE}"
        ) from e
    rows, extra = [], set()
    # Split bytes on b"\n" and decode each line alone, so a bad byte is reported with its line
    # number (decoding the whole file would only give a byte offset).
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{option}: {path}, line {number}"
        text = _decode_line(raw, number, where)
        if not text.strip():
            continue  # blank lines are not rows in JSONL (e.g. a trailing newline)
        record = _parse_object(text, where)
        rows.append(_check_row(record, fields, where))
        extra.update(record.keys() - set(fields))
    return rows, extra


def _decode_line(raw: bytes, number: int, where: str) -> str:
    # A byte-order mark is an encoding artifact some editors write, not content: accept it on
    # the first line only, where it can legitimately appear.
    encoding = "utf-8-sig" if number == 1 else "utf-8"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
            "expected a UTF-8 encoded file"
        ) from e


def _parse_object(text: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        # e.msg and e.colno, not str(e): str(e) says "line 1" for every line of the file.
        problem = f"invalid JSON ({e.msg} at column {e.colno})"
        raise DataError(f"{where}: {problem}; expected one JSON object per line") from e
    except ValueError as e:  # raised by _no_duplicate_keys
        raise DataError(f"{where}: {e}; expected each key once per object") from e
    except RecursionError as e:  # thousands of nested [ or {
        raise DataError(
            f"{where}: JSON nested too deeply to read; expected one flat object per line"
        ) from e
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: got a JSON {_json_type(record)}; expected one JSON object per line"
        )
    return record


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys without a word; that would silently drop data.
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


# --- datasets directories ----------------------------------------------------------------------


def _read_datasets_dir(path: Path, fields: tuple[str, ...], option: str) -> tuple[list, set[str]]:
    if not any((path / name).is_file() for name in _DATASETS_MARKERS):
        raise DataError(
            f"{option}: {path} is a directory but not a datasets save (none of "
            f"{', '.join(_DATASETS_MARKERS)} in it); expected {_EXPECTED_SOURCE}"
        )
    split_dir, label = _pick_split(path, f"{option}: {path}")
    where = f"{option}: {path}{label}"
    if _saved_without_shards(split_dir):
        return [], set()  # load_rows reports "no rows"
    try:
        dataset = datasets.load_from_disk(str(split_dir))
    except (OSError, ValueError, KeyError) as e:  # corrupt or partial saves raise these
        raise DataError(f"{where}: cannot be loaded as a datasets save ({e})") from e
    missing = [name for name in fields if name not in dataset.column_names]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {', '.join(missing)} (columns present: "
            f"{', '.join(dataset.column_names)}); expected columns {', '.join(fields)}"
        )
    rows = []
    for index, record in enumerate(dataset.select_columns(list(fields)).to_list()):
        rows.append(_check_row(record, fields, f"{where}, row {index} (0-based)"))
    return rows, set(dataset.column_names) - set(fields)


def _pick_split(path: Path, where: str) -> tuple[Path, str]:
    """The directory of the one split to read: the only one there is, or "train"; never a guess.

    The split list is read from the DatasetDict's dataset_dict.json and only the chosen split is
    loaded, so an unused split (even an empty one, see _saved_without_shards) cannot break it.
    """
    index = path / "dataset_dict.json"
    if not index.is_file():
        return path, ""  # a single Dataset save
    try:
        splits = list(json.loads(index.read_text(encoding="utf-8"))["splits"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where}: unreadable dataset_dict.json ({e!r})") from e
    if len(splits) == 1:
        name = splits[0]
    elif "train" in splits:
        name = "train"
    else:
        raise DataError(
            f"{where}: holds splits {', '.join(splits) or '(none)'}; expected exactly one "
            "split or a split named 'train'"
        )
    return path / name, f", split {name!r}"


def _saved_without_shards(split_dir: Path) -> bool:
    # `save_to_disk` writes an empty Dataset with no data files at all, and `load_from_disk`
    # then fails with a bare IndexError (datasets 5.x); read state.json to call it "no rows".
    try:
        state = json.loads((split_dir / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # let load_from_disk say what is wrong with it
    return isinstance(state, dict) and state.get("_data_files") == []


# --- row checks shared by both formats ----------------------------------------------------------


def _check_row(record: dict[str, Any], fields: tuple[str, ...], where: str) -> dict[str, str]:
    """The required fields of one row, unchanged; raises if any is missing, not text, or empty."""
    row = {}
    for name in fields:
        if name not in record:
            present = ", ".join(sorted(record)) or "(none)"
            raise DataError(
                f"{where}: field {name!r} is missing (keys present: {present}); "
                f"expected {_EXPECTED_VALUE}"
            )
        value = record[name]
        if not isinstance(value, str):
            raise DataError(
                f"{where}: field {name!r} is a {_json_type(value)}; expected {_EXPECTED_VALUE}"
            )
        _check_text(value, f"{where}: field {name!r}")
        row[name] = value  # kept exactly: leading spaces matter to tokenizers
    if "chosen" in row and "rejected" in row and row["chosen"].strip() == row["rejected"].strip():
        # A pair with nothing to prefer teaches the reward model nothing and hides a data bug.
        raise DataError(
            f"{where}: fields 'chosen' and 'rejected' are identical; expected two different "
            "responses"
        )
    return row


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


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, the vocabulary of the file the user wrote."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is a subclass of int
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, str):
        return "string"
    return type(value).__name__
