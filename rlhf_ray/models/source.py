"""Where a model comes from, checked before Ray starts: a local directory that holds a loadable
model, or a hub id that is in the local cache or answers now.

Without this a wrong `model.name_or_path` surfaced inside the first phase, after minutes, with
transformers' message for a different problem ("Repo id must be in the form...", "You need to
have sentencepiece or tiktoken installed", or 51 seconds of retries when offline), and a
tokenizer that names its own code (`auto_map`) was replaced by one of transformers' classes
without a word when `model.trust_remote_code` was off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rlhf_ray.errors import ConfigError

WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
CONFIG, TOKENIZER_CONFIG = "config.json", "tokenizer_config.json"
ADAPTER_DIR = "adapter"  # a model directory's LoRA adapter, saved alone (models/adapters.py)
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_TIMEOUT_S = 10.0


def check_model_source(name_or_path: str, trust_remote_code: bool, option: str) -> None:
    """Raise ConfigError naming `option` unless `name_or_path` can be loaded as a model.

    A path that exists is always used as a directory, whatever its name; anything else is a
    hub id, which must be in the local cache or be found on the hub within HUB_TIMEOUT_S.
    """
    path = Path(name_or_path)
    where = f"{option}={name_or_path!r}"
    if path.exists():
        check_model_dir(path, trust_remote_code, where)
    elif name_or_path != name_or_path.strip():
        raise ConfigError(
            f"{where}: no such directory, and a hub id has no spaces around it; expected "
            f"{name_or_path.strip()!r}"
        )
    else:
        _check_hub_id(name_or_path, where)
        if not trust_remote_code:
            files = (TOKENIZER_CONFIG, CONFIG)
            configs = {f"{name} of {name_or_path}": _hub_json(name_or_path, name) for name in files}
            _check_tokenizer_code(configs, where)


def check_model_dir(path: Path, trust_remote_code: bool, where: str) -> None:
    """A directory with a config transformers knows, safetensors weights and a tokenizer (whose
    own code, if it names any, is trusted)."""
    if not path.is_dir():
        raise ConfigError(f"{where}: {path} is a file; expected a model directory")
    config = _read_config(path, where)
    _check_architecture(config, trust_remote_code, where)
    if not trust_remote_code:
        tokenizer_config = _read_json(path / TOKENIZER_CONFIG, where) or {}
        configs = {str(path / TOKENIZER_CONFIG): tokenizer_config, str(path / CONFIG): config}
        _check_tokenizer_code(configs, where)
    _check_weights(path, where)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ConfigError(
            f"{where}: {path} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json); "
            "save it next to the model with tokenizer.save_pretrained"
        )


def _read_config(path: Path, where: str) -> dict:
    config = _read_json(path / CONFIG, where)
    if config is None:
        present = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise ConfigError(
            f"{where}: {path} has no config.json (it holds {present}); expected a directory "
            "written by save_pretrained"
        )
    return config


def _read_json(file: Path, where: str) -> dict | None:
    """The JSON object in `file`; None when there is no such file."""
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{where}: {file} cannot be read as JSON ({err})") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {file} holds no JSON object")
    return value


def _hub_json(repo_id: str, name: str) -> dict:
    """The JSON object in the hub model's file `name` (from the cache, or downloaded as loading
    the model would); {} when the model has no such file or it cannot be downloaded."""
    from transformers.utils import cached_file

    file = cached_file(
        repo_id,
        name,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,  # loading the tokenizer names that
    )
    return (_read_json(Path(file), f"model {repo_id!r}") or {}) if file else {}


def _check_tokenizer_code(configs: dict[str, dict], where: str) -> None:
    """With model.trust_remote_code off, a tokenizer that names its own code (`auto_map`) is
    refused: transformers would load one of its own tokenizer classes in its place, silently,
    and train on other token ids than the model's author meant."""
    for name, config in configs.items():
        entry = _tokenizer_auto_map(config.get("auto_map"))
        if entry is not None:
            raise ConfigError(
                f"{where}: {name} asks for the tokenizer's own code (auto_map AutoTokenizer: "
                f"{entry!r}), which transformers runs only with model.trust_remote_code true; "
                "without it another tokenizer class would be loaded in its place. Set "
                "model.trust_remote_code true only if you trust where the model came from"
            )


def _tokenizer_auto_map(auto_map: object) -> object:
    """The tokenizer classes an `auto_map` names: its AutoTokenizer entry, or the whole list in
    the older form (tokenizer_config.json only) that names nothing else."""
    if isinstance(auto_map, dict):
        return auto_map.get("AutoTokenizer")
    return auto_map if isinstance(auto_map, list) else None


def _check_architecture(config: dict, trust_remote_code: bool, where: str) -> None:
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING or (trust_remote_code and config.get("auto_map")):
        return
    if config.get("auto_map"):
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not one transformers knows, and the model "
            "asks to run its own code (auto_map in config.json); set model.trust_remote_code "
            "true only if you trust where it came from"
        )
    raise ConfigError(
        f"{where}: model_type {model_type!r} in config.json is not one transformers knows; "
        "expected an architecture such as mistral or llama"
    )


def _check_weights(path: Path, where: str) -> None:
    from safetensors import SafetensorError, safe_open

    if (path / WEIGHTS_INDEX).is_file():
        try:
            index = json.loads((path / WEIGHTS_INDEX).read_text(encoding="utf-8"))
            files = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{where}: {path / WEIGHTS_INDEX} cannot be read ({err})") from err
    elif (path / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        pickled = [f for f in PICKLED_WEIGHTS if (path / f).is_file()]
        found = f" (only {', '.join(pickled)}: pickle, which can run code)" if pickled else ""
        raise ConfigError(
            f"{where}: {path} has no safetensors weights ({WEIGHTS} or {WEIGHTS_INDEX}){found}; "
            "rlhf-ray loads safetensors only"
        )
    for name in files:
        try:  # the header only: names, shapes, dtypes (no tensor is read)
            with safe_open(str(path / name), framework="pt") as weights:
                weights.keys()
        except (OSError, SafetensorError) as err:
            raise ConfigError(
                f"{where}: {path / name} is not a readable safetensors file ({err})"
            ) from err


def _check_hub_id(repo_id: str, where: str) -> None:
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError as err:
        raise ConfigError(
            f"{where}: no such directory, and not a hub model id either ({err})"
        ) from err
    if isinstance(cached, str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise ConfigError(
            f"{where}: no such directory, and HF_HUB_OFFLINE is set with no copy of {repo_id!r} "
            "in the local hub cache; give the model's directory"
        )
    try:
        huggingface_hub.model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError as err:
        raise ConfigError(
            f"{where}: no such directory, and the hub has no model {repo_id!r} (or it is private "
            "and no token was given)"
        ) from err
    except Exception as err:  # noqa: BLE001 - any network failure: name it, do not retry for a minute
        raise ConfigError(
            f"{where}: no such directory, and the hub cannot be reached to download "
            f"{repo_id!r} ({type(err).__name__}: {err}); download the model where the cluster "
            "can read it and give its directory"
        ) from err
