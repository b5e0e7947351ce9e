"""TRL's conversational formats and the file kinds beyond JSONL: each valid shape loads to the
rows every phase uses; each broken one is refused naming the file, the line or row, the field
and what was expected. Tiny hand-written files; no model, no Ray."""

import json

import datasets
import pytest

from rlhf_ray.data.user_files import PREFERENCE_FIELDS, PROMPT_FIELDS, SFT_FIELDS, load_rows
from rlhf_ray.errors import DataError
from tests import conftest

SYS = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is 2+2?"}
ANSWER = {"role": "assistant", "content": "4."}
WRONG = {"role": "assistant", "content": "5, I think."}


def raises_with(*parts):
    return conftest.raises_with(*parts, exc=DataError)


def jsonl(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- valid: every format, one row each -----------------------------------------------------


def test_sft_conversational_prompt_completion(tmp_path):
    path = jsonl(tmp_path, [{"prompt": [SYS, USER], "completion": [ANSWER]}])
    loaded = load_rows(str(path), SFT_FIELDS, "data.sft_path")
    assert loaded.rows == [{"prompt": [SYS, USER], "completion": [ANSWER]}]
    assert loaded.format == "conversational" and loaded.conversational


def test_sft_messages_split_before_the_last_assistant_message(tmp_path):
    turns = [USER, WRONG, {"role": "user", "content": "Sure?"}, ANSWER]
    path = jsonl(tmp_path, [{"messages": turns, "id": 7}])
    loaded = load_rows(str(path), SFT_FIELDS, "data.sft_path")
    assert loaded.rows == [{"prompt": turns[:3], "completion": [ANSWER]}]
    assert loaded.format == "conversational messages"
    assert loaded.ignored_fields == ("id",)


def test_preferences_explicit_prompt(tmp_path):
    path = jsonl(tmp_path, [{"prompt": [USER], "chosen": [ANSWER], "rejected": [WRONG]}])
    loaded = load_rows(str(path), PREFERENCE_FIELDS, "data.preference_path")
    assert loaded.rows == [{"prompt": [USER], "chosen": [ANSWER], "rejected": [WRONG]}]


def test_preferences_implicit_prompt_as_hh_rlhf_is_shaped(tmp_path):
    """Two whole conversations: the prompt is what they share from the start (several turns)."""
    shared = [USER, WRONG, {"role": "user", "content": "Check again."}]
    path = jsonl(tmp_path, [{"chosen": [*shared, ANSWER], "rejected": [*shared, WRONG]}])
    loaded = load_rows(str(path), PREFERENCE_FIELDS, "data.preference_path")
    assert loaded.rows == [{"prompt": shared, "chosen": [ANSWER], "rejected": [WRONG]}]
    assert loaded.format == "conversational implicit prompt"


def test_prompts_as_message_lists(tmp_path):
    path = jsonl(tmp_path, [{"prompt": [SYS, USER]}, {"prompt": [USER]}])
    loaded = load_rows(str(path), PROMPT_FIELDS, "data.prompt_path")
    assert loaded.rows == [{"prompt": [SYS, USER]}, {"prompt": [USER]}]


def test_parquet_with_message_lists(tmp_path):
    """Columnar files store messages as structs: a key one message lacks comes back as null
    and is dropped, never sent to the template."""
    rows = [
        {"messages": [USER, ANSWER]},
        {"messages": [{**USER, "name": "ann"}, ANSWER]},
    ]
    path = tmp_path / "sft.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    loaded = load_rows(str(path), SFT_FIELDS, "data.sft_path")
    assert loaded.rows == [
        {"prompt": [USER], "completion": [ANSWER]},
        {"prompt": [{**USER, "name": "ann"}], "completion": [ANSWER]},
    ]


def test_csv_text_rows_keep_their_text(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text('prompt,chosen,rejected\n"Hi, there"," Hello!",Go away.\n', encoding="utf-8")
    loaded = load_rows(str(path), PREFERENCE_FIELDS, "data.preference_path")
    assert loaded.rows == [{"prompt": "Hi, there", "chosen": " Hello!", "rejected": "Go away."}]


def test_json_array_file_and_json_lines_named_json(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"prompt": [USER]}, {"prompt": "text"}][:1], indent=2))
    assert load_rows(str(array), PROMPT_FIELDS, "data.prompt_path").rows == [{"prompt": [USER]}]
    lines = jsonl(tmp_path, [{"prompt": "a"}, {"prompt": "b"}], name="l.json")
    assert load_rows(str(lines), PROMPT_FIELDS, "data.prompt_path").rows == [
        {"prompt": "a"},
        {"prompt": "b"},
    ]


def test_save_to_disk_with_message_lists(tmp_path):
    rows = [{"prompt": [USER], "chosen": [ANSWER], "rejected": [WRONG]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    loaded = load_rows(str(tmp_path / "ds"), PREFERENCE_FIELDS, "data.preference_path")
    assert loaded.rows == rows


# --- broken: each names where and what ---------------------------------------------------------


BROKEN_SFT = [
    ({"messages": [USER]}, ("field 'messages'", "not an assistant's")),
    ({"messages": [ANSWER]}, ("field 'messages'", "only the assistant's", "prompt before")),
    ({"messages": [USER, ANSWER], "prompt": "x"}, ("'messages' and 'prompt'", "one format")),
    ({"messages": []}, ("field 'messages'", "empty message list")),
    ({"messages": "User: hi"}, ("field 'messages'", "is a string", "message list")),
    ({"messages": [{"role": "bot", "content": "x"}, ANSWER]}, ("message 0", "role 'bot'")),
    ({"messages": [{"content": "x"}, ANSWER]}, ("message 0", "'role' is missing")),
    ({"messages": [USER, {"role": "assistant", "content": 3}]}, ("message 1", "content is a int")),
    ({"messages": [USER, {"role": "assistant", "content": " "}]}, ("message 1", "empty")),
    ({"prompt": [USER, ANSWER], "completion": [ANSWER]}, ("'prompt'", "ends with an assistant")),
    ({"prompt": [SYS], "completion": [ANSWER]}, ("'prompt'", "has no user message")),
    ({"prompt": [USER], "completion": [ANSWER, ANSWER]}, ("'completion'", "exactly one assistant")),
    ({"prompt": [USER], "completion": [USER]}, ("'completion'", "roles [user]")),
    ({"prompt": "What?", "completion": [ANSWER]}, ("'completion' is a array", "both text")),
]


@pytest.mark.parametrize(("row", "parts"), BROKEN_SFT)
def test_broken_conversational_sft_rows(tmp_path, row, parts):
    good = {"prompt": [USER], "completion": [ANSWER]}
    path = jsonl(tmp_path, [good, row])
    with raises_with("data.sft_path", f"{path}, line 2", *parts):
        load_rows(str(path), SFT_FIELDS, "data.sft_path")


BROKEN_PAIRS = [
    ({"chosen": "Yes.", "rejected": "No."}, ("without a 'prompt'", "would be a guess")),
    ({"chosen": [USER, ANSWER], "rejected": [SYS, WRONG]}, ("share no first message",)),
    ({"chosen": [USER, ANSWER], "rejected": [USER, ANSWER]}, ("identical",)),
    ({"chosen": [USER, ANSWER], "rejected": [USER]}, ("'rejected' has nothing after",)),
    (
        {"chosen": [USER, ANSWER, USER], "rejected": [USER, WRONG]},
        ("'chosen' after", "[assistant, user]"),
    ),
    ({"prompt": [USER], "chosen": [ANSWER], "rejected": [ANSWER]}, ("identical",)),
]


@pytest.mark.parametrize(("row", "parts"), BROKEN_PAIRS)
def test_broken_conversational_pairs(tmp_path, row, parts):
    path = jsonl(tmp_path, [row])
    with raises_with("data.preference_path", f"{path}, line 1", *parts):
        load_rows(str(path), PREFERENCE_FIELDS, "data.preference_path")


def test_a_file_mixing_text_and_conversational_rows_is_refused(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "Hi"}, {"prompt": [USER]}])
    with raises_with(f"{path}, line 2", "a conversational row", f"{path}, line 1 is text"):
        load_rows(str(path), PROMPT_FIELDS, "data.prompt_path")


def test_a_file_mixing_messages_and_prompt_completion_is_refused(tmp_path):
    path = jsonl(
        tmp_path, [{"messages": [USER, ANSWER]}, {"prompt": [USER], "completion": [ANSWER]}]
    )
    with raises_with(f"{path}, line 2", "conversational row", "is conversational messages"):
        load_rows(str(path), SFT_FIELDS, "data.sft_path")


def test_parquet_row_errors_name_the_row(tmp_path):
    path = tmp_path / "p.parquet"
    datasets.Dataset.from_list([{"prompt": [USER]}, {"prompt": [ANSWER]}]).to_parquet(str(path))
    with raises_with("data.prompt_path", path, "row 1 (0-based)", "ends with an assistant"):
        load_rows(str(path), PROMPT_FIELDS, "data.prompt_path")


def test_damaged_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1 not really")
    with raises_with("data.prompt_path", path, "cannot be read as parquet"):
        load_rows(str(path), PROMPT_FIELDS, "data.prompt_path")


def test_csv_errors_name_the_line(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("prompt,completion\nHi,Hello\nHey,\n", encoding="utf-8")
    with raises_with("data.sft_path", f"{path}, line 3", "'completion' is empty"):
        load_rows(str(path), SFT_FIELDS, "data.sft_path")
    path.write_text("prompt,completion\nHi,Hello,extra\n", encoding="utf-8")
    with raises_with(f"{path}, line 2", "more cells than the header"):
        load_rows(str(path), SFT_FIELDS, "data.sft_path")
    path.write_text("prompt,answer\nHi,Hello\n", encoding="utf-8")
    with raises_with(path, "missing column(s) completion", "prompt, completion or messages"):
        load_rows(str(path), SFT_FIELDS, "data.sft_path")


def test_json_file_errors(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{\n  "prompt": "one object over lines"\n}\n', encoding="utf-8")
    with raises_with(path, "one JSON object over several lines", "array of row objects"):
        load_rows(str(path), PROMPT_FIELDS, "data.prompt_path")
    path.write_text('[{"prompt": "a"}, "b"]', encoding="utf-8")
    with raises_with(path, "item 1 (0-based)", "a JSON string", "row object"):
        load_rows(str(path), PROMPT_FIELDS, "data.prompt_path")


def test_a_missing_file_named_like_a_file_is_not_a_dataset_id(tmp_path):
    with raises_with("data.sft_path", "nope.parquet", "does not exist"):
        load_rows("nope.parquet", SFT_FIELDS, "data.sft_path")


def test_a_dataset_id_that_cannot_be_had_offline(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with raises_with("data.sft_path", "dataset 'rlhf-ray-tests/none'", "split 'dev'", "loaded"):
        load_rows("rlhf-ray-tests/none:dev", SFT_FIELDS, "data.sft_path")
