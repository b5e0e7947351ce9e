"""Where user rows come from: files, `datasets` saves and dataset ids, read into plain records.

Each record comes with the words that locate it for an error message: a JSONL or CSV line
(1-based, as editors count), a JSON array item or a dataset row (0-based, as `data[i]` counts).
Sources, by what the path is:
  a .parquet / .csv / .json file   read as such (a .json file holding JSON lines is read as JSONL)
  any other file                   JSON Lines
  a `save_to_disk` directory       `datasets.load_from_disk` (one split, or the one named train)
  another directory (DIR:SPLIT)    `datasets.load_dataset(DIR, split=SPLIT or "train")`, which
                                   infers the format of the data files in it
  NAME or NAME:SPLIT, not a path   `datasets.load_dataset(NAME, split=SPLIT or "train")`, a
                                   dataset id (from the hub, or its cache when offline)
"""

from __future__ import annotations

import csv
import json
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_ray.errors import DataError

if TYPE_CHECKING:  # `datasets` (~1 s to import) loads only where a source needs it
    import datasets

# Files a `save_to_disk` directory always holds: a Dataset writes the first two, a
# DatasetDict writes the third.
_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
EXPECTED_SOURCE = (
    "a JSONL, JSON, parquet or CSV file, a datasets save_to_disk directory, a directory of data "
    "files, or a dataset id (NAME or NAME:SPLIT)"
)


@dataclass(frozen=True)
class Records:
    items: list[tuple[str, dict[str, Any]]]  # (where, record) in source order
    columns: tuple[str, ...] | None  # a table's columns (every record has them all), else None


def read_records(path: str, option: str) -> Records:
    p = Path(path)
    if p.is_dir():
        return _read_directory(p, option)
    if p.exists():
        _check_regular_file(p, option)
        return _read_file(p, option)
    if p.is_symlink():  # exists() follows the link: it leads nowhere, or around in a loop
        raise DataError(
            f"{option}: {path} is a symbolic link to {p.readlink()}, which does not resolve to a "
            f"file (a missing target or a loop of links); expected {EXPECTED_SOURCE}"
        )
    if path != path.strip() and Path(path.strip()).exists():
        raise DataError(
            f"{option}={path!r}: no such file or directory, but {path.strip()!r} exists; "
            "expected the path without the spaces around it"
        )
    name, colon, split = path.rpartition(":")
    if colon and Path(name).is_dir():
        where = f"{option}: {name}, split {split!r}"
        return _load_dataset(name, split, where, f"{where} (read by datasets.load_dataset)")
    if _looks_like_path(path):
        raise DataError(f"{option}: {path} does not exist; expected {EXPECTED_SOURCE}")
    return _read_dataset_id(path, option)


def _looks_like_path(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.endswith(_FILE_SUFFIXES) or "\\" in path


# --- files ---------------------------------------------------------------------------------------


# Special files open without end or at all: a FIFO with no writer blocks its reader forever.
_SPECIAL_FILES = {
    stat.S_ISFIFO: "a named pipe (FIFO)",
    stat.S_ISSOCK: "a socket",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
}
# Compressed files by their first bytes (no text file starts so): read as text they would give
# a misleading row error.
_COMPRESSED = {
    "gzip": re.compile(rb"\x1f\x8b"),
    "bzip2": re.compile(rb"BZh[1-9]1AY&SY"),
    "xz": re.compile(rb"\xfd7zXZ\x00"),
    "zstd": re.compile(rb"\x28\xb5\x2f\xfd"),
    "zip": re.compile(rb"PK\x03\x04"),
}


def _check_regular_file(path: Path, option: str) -> None:
    """A path that exists but is no regular file is named for what it is, before it is opened."""
    mode = path.stat().st_mode
    for is_kind, kind in _SPECIAL_FILES.items():
        if is_kind(mode):
            raise DataError(
                f"{option}: {path} is {kind}, not a data file; expected {EXPECTED_SOURCE}"
            )


def _read_file(path: Path, option: str) -> Records:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{option}: {path} cannot be read ({e}); expected {EXPECTED_SOURCE}") from e
    for kind, magic in _COMPRESSED.items():
        if magic.match(data):
            raise DataError(
                f"{option}: {path} is a {kind}-compressed file; decompress it first "
                f"(rlhf-ray reads {EXPECTED_SOURCE})"
            )
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, option)
    if suffix == ".csv":
        return _read_csv(data, f"{option}: {path}")
    if suffix == ".json":
        array = _json_array(data, f"{option}: {path}")
        if array is not None:
            return array
    return Records(_read_jsonl(data, f"{option}: {path}"), None)


def _read_jsonl(data: bytes, where: str) -> list[tuple[str, dict]]:
    items = []
    # Split bytes on b"\n" and decode each line alone, so a bad byte is reported with its line
    # number (decoding the whole file would only give a byte offset).
    for number, raw in enumerate(data.split(b"\n"), start=1):
        here = f"{where}, line {number}"
        text = _decode(raw, here, bom_allowed=number == 1)
        if not text.strip():
            continue  # blank lines are not rows in JSONL (e.g. a trailing newline)
        items.append((here, _parse_object(text, here, "one JSON object per line")))
    return items


def _json_array(data: bytes, where: str) -> Records | None:
    """The rows of a file holding one JSON array of objects; None if it is not one JSON value
    (then it is read as JSON lines, whose errors name a line)."""
    text = _decode(data, where, bom_allowed=True)
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (json.JSONDecodeError, RecursionError):
        return None
    except ValueError as e:  # raised by _no_duplicate_keys
        raise DataError(f"{where}: {e}; expected each key once per object") from e
    if isinstance(value, dict):
        if text.strip().count("\n"):
            raise DataError(
                f"{where}: one JSON object over several lines; expected an array of row "
                "objects, or one object per line"
            )
        return Records([(f"{where}, line 1", value)], None)
    if not isinstance(value, list):
        raise DataError(f"{where}: a JSON {json_type(value)}; expected an array of row objects")
    items = []
    for i, item in enumerate(value):
        here = f"{where}, item {i} (0-based)"
        if not isinstance(item, dict):
            raise DataError(f"{here}: a JSON {json_type(item)}; expected a row object")
        items.append((here, item))
    return Records(items, None)


def _read_csv(data: bytes, where: str) -> Records:
    text = _decode(data, where, bom_allowed=True)
    reader = csv.DictReader(text.splitlines(keepends=True), strict=True)
    items = []
    try:
        for record in reader:
            here = f"{where}, line {reader.line_num}"
            if None in record:  # more cells than header names
                raise DataError(f"{here}: more cells than the header has columns")
            items.append((here, {k: v for k, v in record.items() if v is not None}))
    except csv.Error as e:
        raise DataError(f"{where}, line {reader.line_num}: not valid CSV ({e})") from e
    return Records(items, tuple(reader.fieldnames or ()))


def _read_parquet(path: Path, option: str) -> Records:
    import datasets

    where = f"{option}: {path}"
    try:
        dataset = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds for a damaged file
        raise DataError(f"{where}: cannot be read as parquet ({type(e).__name__}: {e})") from e
    return _dataset_records(dataset, where)


def _decode(raw: bytes, where: str, bom_allowed: bool) -> str:
    # A byte-order mark is an encoding artifact some editors write, not content: accept it at
    # the start of a file only, where it can legitimately appear.
    try:
        return raw.decode("utf-8-sig" if bom_allowed else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
            "expected a UTF-8 encoded file"
        ) from e


def _parse_object(text: str, where: str, expected: str) -> dict[str, Any]:
    try:
        record = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        # e.msg and e.colno, not str(e): str(e) says "line 1" for every line of the file.
        problem = f"invalid JSON ({e.msg} at column {e.colno})"
        raise DataError(f"{where}: {problem}; expected {expected}") from e
    except ValueError as e:  # raised by _no_duplicate_keys
        raise DataError(f"{where}: {e}; expected each key once per object") from e
    except RecursionError as e:  # thousands of nested [ or {
        raise DataError(f"{where}: JSON nested too deeply to read; expected {expected}") from e
    if not isinstance(record, dict):
        raise DataError(f"{where}: got a JSON {json_type(record)}; expected {expected}")
    return record


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys without a word; that would silently drop data.
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


# --- datasets ------------------------------------------------------------------------------------


def _read_directory(path: Path, option: str) -> Records:
    where = f"{option}: {path}"
    if not any((path / name).is_file() for name in _DATASETS_MARKERS):
        return _load_dataset(str(path), "train", where, f"{where} (read by datasets.load_dataset)")
    split_dir, label = _pick_split(path, where)
    where += label
    if _saved_without_shards(split_dir):
        return Records([], None)  # the caller reports "no rows"
    import datasets

    try:
        dataset = datasets.load_from_disk(str(split_dir))
    except (OSError, ValueError, KeyError) as e:  # corrupt or partial saves raise these
        raise DataError(f"{where}: cannot be loaded as a datasets save ({e})") from e
    return _dataset_records(dataset, where)


def _read_dataset_id(spec: str, option: str) -> Records:
    name, _, split = spec.partition(":")
    split = split or "train"
    where = f"{option}: dataset {name!r}, split {split!r}"
    return _load_dataset(name, split, where, where)


def _load_dataset(name: str, split: str, where: str, failed: str) -> Records:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - the hub, the network and the builders raise many kinds
        raise DataError(
            f"{failed}: cannot be loaded ({type(e).__name__}: {e}); expected {EXPECTED_SOURCE}"
        ) from e
    return _dataset_records(dataset, where)


def _dataset_records(dataset: datasets.Dataset, where: str) -> Records:
    items = [(f"{where}, row {i} (0-based)", row) for i, row in enumerate(dataset.to_list())]
    return Records(items, tuple(dataset.column_names))


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


def json_type(value: Any) -> str:
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
