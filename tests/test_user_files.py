"""Tests for rlhf_ray.data.user_files on tiny hand-written JSONL files and `datasets` directories.

Every error test checks that the message names the option, the file, the line or row, and the
field, since that is what lets a user fix the file.
"""

import bz2
import gzip
import lzma
import os
import time

import datasets
import pytest

from rlhf_ray.data.user_files import PREFERENCE_FIELDS, PROMPT_FIELDS, SFT_FIELDS, load_rows
from rlhf_ray.errors import DataError
from tests import conftest

OPT = "data.sft_path"


def raises_with(*parts):
    return conftest.raises_with(*parts, exc=DataError)


def write(tmp_path, text, name="rows.jsonl"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def save(tmp_path, data, name="ds"):
    path = tmp_path / name
    data.save_to_disk(str(path))
    return path


# --- valid input ----------------------------------------------------------------------------


def test_jsonl_sft_rows_kept_exactly_blank_lines_skipped_extras_reported(tmp_path):
    path = write(
        tmp_path,
        '{"prompt": "Hi", "completion": " Hello.", "id": 1}\n'
        "\n"
        "   \n"
        '{"prompt": "2+2?", "completion": "4", "source": "x", "id": 2}\n',
    )
    loaded = load_rows(str(path), SFT_FIELDS, OPT)
    assert loaded.rows == [
        {"prompt": "Hi", "completion": " Hello."},  # leading space kept: tokenizers see it
        {"prompt": "2+2?", "completion": "4"},
    ]
    assert loaded.source == str(path)
    assert loaded.ignored_fields == ("id", "source")  # sorted, unique across rows


def test_jsonl_preferences_with_bom_and_crlf(tmp_path):
    path = write(
        tmp_path,
        b'\xef\xbb\xbf{"prompt": "p", "chosen": "good", "rejected": "bad"}\r\n'
        b'{"prompt": "q", "chosen": "\xc3\xa9t\xc3\xa9", "rejected": "hiver"}\r\n',
    )
    loaded = load_rows(str(path), PREFERENCE_FIELDS, "data.preference_path")
    assert loaded.rows == [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "chosen": "été", "rejected": "hiver"},
    ]
    assert loaded.ignored_fields == ()


def test_datasets_dir_rows_and_ignored_columns(tmp_path):
    rows = [{"prompt": "a", "extra": "x"}, {"prompt": "b", "extra": "y"}]
    path = save(tmp_path, datasets.Dataset.from_list(rows))
    loaded = load_rows(str(path), PROMPT_FIELDS, "data.prompt_path")
    assert loaded.rows == [{"prompt": "a"}, {"prompt": "b"}]
    assert loaded.source == str(path)
    assert loaded.ignored_fields == ("extra",)


def test_datasets_dict_single_split_of_any_name(tmp_path):
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_list([{"prompt": "only"}])})
    loaded = load_rows(str(save(tmp_path, dd)), PROMPT_FIELDS, "data.prompt_path")
    assert loaded.rows == [{"prompt": "only"}]


def test_datasets_dict_several_splits_uses_train(tmp_path):
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"prompt": "t"}]),
            "test": datasets.Dataset.from_list([{"prompt": "e"}]),
            # An empty split is saved without data files; being unused, it must not matter.
            "validation": datasets.Dataset.from_dict({"prompt": []}),
        }
    )
    loaded = load_rows(str(save(tmp_path, dd)), PROMPT_FIELDS, "data.prompt_path")
    assert loaded.rows == [{"prompt": "t"}]


# --- the path itself ------------------------------------------------------------------------


def test_missing_path(tmp_path):
    path = tmp_path / "nope.jsonl"
    with raises_with(OPT, path, "does not exist"):
        load_rows(str(path), SFT_FIELDS, OPT)


def test_a_path_with_spaces_around_an_existing_file(tmp_path, monkeypatch):
    """Before: taken for a hub dataset id ('rows.jsonl '), refused for the hub's reasons."""
    write(tmp_path, '{"prompt": "p", "completion": "c"}\n')
    monkeypatch.chdir(tmp_path)
    with raises_with(f"{OPT}='rows.jsonl ': no such file", "but 'rows.jsonl' exists", "spaces"):
        load_rows("rows.jsonl ", SFT_FIELDS, OPT)


def test_directory_of_data_files_goes_through_load_dataset(tmp_path):
    """Not a save_to_disk directory: datasets.load_dataset reads the files in it, offline."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "plain" / "test.jsonl").write_text('{"prompt": "c", "completion": "d"}\n')
    assert load_rows(str(tmp_path / "plain"), SFT_FIELDS, OPT).rows == [
        {"prompt": "a", "completion": "b"}
    ]
    loaded = load_rows(f"{tmp_path / 'plain'}:test", SFT_FIELDS, OPT)
    assert loaded.rows == [{"prompt": "c", "completion": "d"}]
    assert loaded.format == "text"


def test_directory_without_data_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with raises_with(OPT, tmp_path / "empty", "load_dataset", "cannot be loaded"):
        load_rows(str(tmp_path / "empty"), SFT_FIELDS, OPT)


@pytest.mark.parametrize("text", ["", "\n\n  \n"], ids=["zero_bytes", "blank_lines"])
def test_empty_jsonl_has_no_rows(tmp_path, text):
    path = write(tmp_path, text)
    with raises_with(OPT, path, "no rows"):
        load_rows(str(path), SFT_FIELDS, OPT)


@pytest.mark.parametrize("as_dict", [False, True], ids=["dataset", "dataset_dict"])
def test_empty_datasets_dir_has_no_rows(tmp_path, as_dict):
    data = datasets.Dataset.from_dict({"prompt": [], "completion": []})
    path = save(tmp_path, datasets.DatasetDict({"train": data}) if as_dict else data)
    with raises_with(OPT, path, "no rows"):
        load_rows(str(path), SFT_FIELDS, OPT)


# --- JSONL line errors --------------------------------------------------------------------


GOOD = b'{"prompt": "a", "completion": "b"}\n'


def test_bad_utf8_names_line(tmp_path):
    path = write(tmp_path, GOOD + b'{"prompt": "caf\xe9", "completion": "b"}\n')
    with raises_with(OPT, f"{path}, line 2", "not valid UTF-8", "0xe9"):
        load_rows(str(path), SFT_FIELDS, OPT)


def test_malformed_json_names_line_and_json_message(tmp_path):
    path = write(tmp_path, GOOD + b'{"prompt": "a", "completion": }\n')
    with raises_with(OPT, f"{path}, line 2", "invalid JSON", "Expecting value", "column 31"):
        load_rows(str(path), SFT_FIELDS, OPT)


def test_line_numbers_count_blank_lines(tmp_path):
    path = write(tmp_path, GOOD + b"\n\n" + b"{oops\n")
    with raises_with(f"{path}, line 4", "invalid JSON"):
        load_rows(str(path), SFT_FIELDS, OPT)


@pytest.mark.parametrize(
    ("line", "kind"), [('["a", "b"]', "array"), ('"text"', "string"), ("3", "number")]
)
def test_json_that_is_not_an_object(tmp_path, line, kind):
    path = write(tmp_path, GOOD.decode() + line + "\n")
    with raises_with(OPT, f"{path}, line 2", f"got a JSON {kind}", "one JSON object per line"):
        load_rows(str(path), SFT_FIELDS, OPT)


def test_duplicate_key_is_an_error_not_a_silent_overwrite(tmp_path):
    path = write(tmp_path, '{"prompt": "a", "completion": "b", "prompt": "c"}\n')
    with raises_with(OPT, f"{path}, line 1", "'prompt' appears twice"):
        load_rows(str(path), SFT_FIELDS, OPT)


def test_missing_field_names_field_and_keys_present(tmp_path):
    path = write(tmp_path, GOOD.decode() + '{"prompt": "a", "response": "b"}\n')
    with raises_with(OPT, f"{path}, line 2", "'completion' is missing", "prompt, response"):
        load_rows(str(path), SFT_FIELDS, OPT)


@pytest.mark.parametrize(
    ("value", "kind"),
    [("3", "number"), ("null", "null"), ('["x"]', "array"), ("true", "boolean"), ("{}", "object")],
)
def test_field_that_is_not_a_string(tmp_path, value, kind):
    path = write(tmp_path, '{"prompt": "a", "completion": ' + value + "}\n")
    with raises_with(OPT, f"{path}, line 1", f"'completion' is a {kind}", "non-empty string"):
        load_rows(str(path), SFT_FIELDS, OPT)


@pytest.mark.parametrize("value", ['""', '"   "', '"\\n\\t"'])
def test_empty_or_whitespace_field(tmp_path, value):
    path = write(tmp_path, GOOD.decode() + '{"prompt": ' + value + ', "completion": "b"}\n')
    with raises_with(OPT, f"{path}, line 2", "'prompt' is empty or only whitespace"):
        load_rows(str(path), SFT_FIELDS, OPT)


@pytest.mark.parametrize("value", ['"\\u200b\\u200b"', '"\\ufeff \\u2060"', '"\\u0000"'])
def test_a_field_of_invisible_characters_only(tmp_path, value):
    path = write(tmp_path, GOOD.decode() + '{"prompt": ' + value + ', "completion": "b"}\n')
    with raises_with(OPT, f"{path}, line 2", "'prompt' is empty or only whitespace or invisible"):
        load_rows(str(path), SFT_FIELDS, OPT)


def test_a_lone_surrogate_is_named(tmp_path):
    path = write(tmp_path, GOOD.decode() + '{"prompt": "ab\\ud800", "completion": "b"}\n')
    with raises_with(OPT, f"{path}, line 2", "'prompt'", "at character 3", "expected text"):
        load_rows(str(path), SFT_FIELDS, OPT)


def test_a_ten_megabyte_line_is_refused_in_seconds(tmp_path):
    huge = "x" * 10_000_000  # one word: tokenizer training on it would run for hours
    path = write(tmp_path, GOOD.decode() + '{"prompt": "p", "completion": "' + huge + '"}\n')
    start = time.time()
    with raises_with(OPT, f"{path}, line 2", "'completion' has 10,000,000 characters"):
        load_rows(str(path), SFT_FIELDS, OPT)
    assert time.time() - start < 10


def test_json_nested_too_deeply(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    path = write(
        tmp_path, GOOD.decode() + '{"prompt": "p", "completion": "c", "x": ' + deep + "}\n"
    )
    with raises_with(OPT, f"{path}, line 2", "nested too deeply"):
        load_rows(str(path), SFT_FIELDS, OPT)


def test_chosen_identical_to_rejected_after_strip(tmp_path):
    opt = "data.preference_path"
    path = write(
        tmp_path,
        '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
        '{"prompt": "p", "chosen": " same\\n", "rejected": "same"}\n',
    )
    with raises_with(opt, f"{path}, line 2", "'chosen' and 'rejected' are identical"):
        load_rows(str(path), PREFERENCE_FIELDS, opt)


# --- datasets directory errors --------------------------------------------------------------


def test_datasets_dict_without_train_lists_splits(tmp_path):
    one = datasets.Dataset.from_list([{"prompt": "a"}])
    path = save(tmp_path, datasets.DatasetDict({"dev": one, "test": one}))
    with raises_with("data.prompt_path", path, "dev, test", "'train'"):
        load_rows(str(path), PROMPT_FIELDS, "data.prompt_path")


def test_datasets_missing_column(tmp_path):
    path = save(tmp_path, datasets.Dataset.from_list([{"prompt": "a", "response": "b"}]))
    with raises_with(OPT, path, "missing column(s) completion", "columns present: prompt"):
        load_rows(str(path), SFT_FIELDS, OPT)


def test_datasets_null_value_names_row(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]
    path = save(tmp_path, datasets.Dataset.from_list(rows))
    with raises_with(OPT, path, "row 1 (0-based)", "'completion' is a null"):
        load_rows(str(path), SFT_FIELDS, OPT)


def test_datasets_non_string_column_names_row(tmp_path):
    path = save(tmp_path, datasets.Dataset.from_dict({"prompt": ["a"], "completion": [7]}))
    with raises_with(OPT, path, "row 0 (0-based)", "'completion' is a number"):
        load_rows(str(path), SFT_FIELDS, OPT)


def test_datasets_split_named_in_row_errors(tmp_path):
    ds = datasets.Dataset.from_list([{"prompt": "ok"}, {"prompt": " "}])
    path = save(tmp_path, datasets.DatasetDict({"train": ds}))
    with raises_with(path, "split 'train', row 1", "'prompt' is empty"):
        load_rows(str(path), PROMPT_FIELDS, "data.prompt_path")


# --- paths that exist but are no data file ------------------------------------------------------


def test_a_named_pipe_is_named_for_what_it_is_instead_of_blocking(tmp_path):
    """Opening a FIFO with no writer blocks forever: it must be refused before it is opened."""
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    with raises_with(OPT, str(fifo), "is a named pipe (FIFO), not a data file"):
        load_rows(str(fifo), SFT_FIELDS, OPT)


def test_a_symlink_loop_is_named_for_what_it_is(tmp_path):
    (tmp_path / "a.jsonl").symlink_to(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "a.jsonl")
    path = tmp_path / "a.jsonl"
    with raises_with(OPT, str(path), "is a symbolic link to", "missing target or a loop"):
        load_rows(str(path), SFT_FIELDS, OPT)


@pytest.mark.parametrize(
    ("kind", "compress"),
    [("gzip", gzip.compress), ("bzip2", bz2.compress), ("xz", lzma.compress)],
)
def test_a_compressed_file_is_named_for_what_it_is(tmp_path, kind, compress):
    rows = b'{"prompt": "Say one.", "completion": "one"}\n'
    path = write(tmp_path, compress(rows), name="rows.jsonl")
    with raises_with(OPT, str(path), f"is a {kind}-compressed file; decompress it first"):
        load_rows(str(path), SFT_FIELDS, OPT)
