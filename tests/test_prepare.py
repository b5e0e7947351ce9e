"""Data preparation: user files, over-length rows, and errors that stop a run before Ray."""

from __future__ import annotations

import json

import ray

from jobs import phases, rlhf
from rlhf_ray.data.prepare import prepare_run, read_rows
from tests.conftest import smoke_config

LONG = " ".join(["word"] * 200)  # far over any completion limit used here


def _write_sft(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_overlong_rows_are_counted_and_truncated(tmp_path):
    sft = tmp_path / "sft.jsonl"
    _write_sft(
        sft, [{"prompt": "Hi", "completion": "Hello."}, {"prompt": "Hi", "completion": LONG}]
    )
    cfg = smoke_config(tmp_path / "out", **{"data.sft_path": str(sft)})
    prepared = prepare_run(cfg)
    assert prepared.report["sft"] == {
        "source": str(sft),
        "format": "text",
        "ignored_fields": [],
        "rows": 2,
        "overlong": 1,
        "overlong_action": "truncate",
        "repeated_rows": 0,
    }
    assert len(read_rows(prepared.data_dir, "sft")) == 2  # kept; cut at tokenization


def test_rows_repeated_in_a_file_are_kept_and_counted(tmp_path, capsys):
    """A file concatenated twice looks like upsampling: kept, and said (before: silently)."""
    sft = tmp_path / "sft.jsonl"
    rows = [{"prompt": "Hi", "completion": "Hello."}, {"prompt": "Yo", "completion": "Hey."}]
    _write_sft(sft, rows + rows + rows[:1])
    cfg = smoke_config(tmp_path / "out", **{"data.sft_path": str(sft)})
    prepared = prepare_run(cfg)
    assert (prepared.report["sft"]["rows"], prepared.report["sft"]["repeated_rows"]) == (5, 3)
    assert "repeated_rows" not in prepared.report["prompts"]  # synthetic rows are not counted
    phases.print_data_report(cfg, prepared.report)
    assert "; 3 repeat an earlier row exactly (kept)" in capsys.readouterr().out


def test_overlong_rows_are_rejected_when_configured(tmp_path):
    sft = tmp_path / "sft.jsonl"
    _write_sft(
        sft,
        [{"prompt": "Hi", "completion": "Hello.", "id": 7}, {"prompt": "Hi", "completion": LONG}],
    )
    cfg = smoke_config(
        tmp_path / "out",
        **{
            "data.sft_path": str(sft),
            "data.overlong": "reject",
            "data.max_completion_tokens": "32",
        },
    )
    prepared = prepare_run(cfg)
    assert prepared.report["sft"]["rows"] == 1
    assert prepared.report["sft"]["overlong"] == 1
    assert prepared.report["sft"]["ignored_fields"] == ["id"]  # reported, not silently dropped
    assert read_rows(prepared.data_dir, "sft") == [{"prompt": "Hi", "completion": "Hello."}]


def test_bad_data_file_exits_2_naming_file_line_and_field_before_ray(tmp_path, capsys):
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"prompt": "Hi", "completion": "Hello."}\n{"prompt": "Hi", "completion": 3}\n')
    was_running = ray.is_initialized()
    code = rlhf.main(
        ["--config", "smoke", "--output_dir", str(tmp_path / "out"), "--data.sft_path", str(sft)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "data.sft_path" in err and "sft.jsonl, line 2" in err and "'completion'" in err
    assert ray.is_initialized() == was_running  # no Ray was started for a doomed run
    assert not (tmp_path / "out" / "data").exists()
