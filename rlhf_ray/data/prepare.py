"""Everything that happens before Ray starts: data, tokenizer, the base model directory.

User files are validated here (file, line, field), so bad input fails before any model is
loaded or Ray resource taken. The rows every phase uses are written to `<output_dir>/data/`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from rlhf_ray.config import Config, DataConfig
from rlhf_ray.data import chat, user_files
from rlhf_ray.data.encoding import Limits, is_overlong
from rlhf_ray.data.jsonl import read_jsonl, write_jsonl
from rlhf_ray.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from rlhf_ray.errors import ConfigError, DataError
from rlhf_ray.models.loading import build_embedded_model
from rlhf_ray.models.source import check_model_dir
from rlhf_ray.run import fingerprints
from rlhf_ray.run.checkpoints import replace_dir
from rlhf_ray.world import dataset_rows
from rlhf_ray.world.gold_judge import GoldJudge

# Written into <output_dir>/data/ beside the rows: it tells rlhf-ray's own output from a user's
DATA_MARKER = ".written-by-rlhf-ray"
_MARKER_TEXT = "rlhf-ray writes this directory anew on every run: keep no files of your own here\n"
DATASETS = ("sft", "preferences", "preferences_eval", "prompts", "eval_prompts")
_CORPUS_CHARS = 4096
_COMPLETION_FIELDS = {"sft": ("completion",), "preferences": ("chosen", "rejected")}


@dataclass(frozen=True)
class PreparedRun:
    base_path: str  # the model directory or hub id SFT starts from
    data_dir: Path  # holds <name>.jsonl for each of DATASETS
    report: dict  # per dataset: source, rows, overlong rows, ignored fields


def limits_of(cfg: DataConfig) -> Limits:
    return Limits(
        cfg.prompt_template,
        cfg.max_prompt_tokens,
        cfg.max_completion_tokens,
        chat.read_template(cfg.chat_template),
    )


def read_rows(data_dir: Path, name: str) -> list[dict]:
    """Rows this module wrote (already validated)."""
    return read_jsonl(data_dir / f"{name}.jsonl")


def prepare_run(cfg: Config, before_writing: Callable[[Path], None] | None = None) -> PreparedRun:
    """`before_writing(staged_dir)`, given the rows as they are about to be written, may raise
    to keep the rows already in `<output_dir>/data/` (a run refused for changed settings)."""
    out = Path(cfg.run.output_dir)
    check_data_dir_is_ours(out / "data")
    rows, report = gather_rows(cfg.data, cfg.reward.eval_fraction, cfg.run.seed)
    limits = limits_of(cfg.data)
    tokenizer, base_path = _base_model(cfg, rows, out)
    if is_conversational(rows):
        _check_chat_template(tokenizer, limits, cfg)
    for name in DATASETS:
        kept, overlong = _apply_limits(name, rows[name], tokenizer, limits, cfg.data.overlong)
        rows[name] = kept
        report[name].update(rows=len(kept), overlong=overlong, overlong_action=cfg.data.overlong)
        if report[name]["source"] != "synthetic":
            report[name]["repeated_rows"] = repeated_rows(kept)
    with replace_dir(out / "data") as tmp:
        for name, dataset in rows.items():
            write_jsonl(tmp / f"{name}.jsonl", dataset)
        (tmp / DATA_MARKER).write_text(_MARKER_TEXT, encoding="utf-8")
        if before_writing is not None:
            before_writing(tmp)
    return PreparedRun(base_path, out / "data", report)


def check_data_dir_is_ours(data_dir: Path) -> None:
    """`<output_dir>/data/` is replaced by every run: refuse, naming them, if it holds files
    rlhf-ray did not write there (a user's own sft.jsonl, notes), instead of deleting them."""
    if not data_dir.is_dir():
        if data_dir.exists():
            raise ConfigError(f"{data_dir} is a file; rlhf-ray writes its data directory there")
        return
    entries = sorted(p.name for p in data_dir.iterdir())
    own = {f"{name}.jsonl" for name in DATASETS}
    written_by_us = DATA_MARKER in entries or set(entries) == own  # the latter: before the marker
    foreign = [e for e in entries if e not in own | {DATA_MARKER}] if written_by_us else entries
    if foreign:
        raise ConfigError(
            f"run.output_dir: {data_dir} holds files rlhf-ray did not write "
            f"({', '.join(foreign)}); every run replaces that directory, so move them "
            "elsewhere (and point data.* at their new place) or choose another run.output_dir"
        )


def repeated_rows(rows: list[dict]) -> int:
    """Rows equal to an earlier one: kept (a repeat weighs a row more, as upsampling does), and
    counted for the data report, since a file concatenated twice looks the same."""
    seen: set[str] = set()
    repeats = 0
    for row in rows:
        key = json.dumps(row, sort_keys=True)
        repeats += key in seen
        seen.add(key)
    return repeats


def gather_rows(cfg: DataConfig, eval_fraction: float, seed: int) -> tuple[dict, dict]:
    """User files where given, synthetic rows for the rest; preferences split train/eval."""
    rng = random.Random(seed)
    # Synthetic prompts are held out only for synthetic evaluation; with the user's own eval
    # prompts, every synthetic prompt may be trained on.
    held_out = cfg.num_eval_prompts if cfg.eval_prompt_path is None else 0
    train_specs, eval_specs = dataset_rows.split_prompts(held_out, seed)
    judge = GoldJudge()
    synthetic = {
        "sft": lambda: dataset_rows.sft_rows(train_specs, cfg, rng),
        "preferences": lambda: dataset_rows.preference_rows(
            train_specs, cfg.num_preferences, cfg, judge, rng
        ),
        "prompts": lambda: dataset_rows.prompt_rows(train_specs, cfg.num_prompts, rng),
        "eval_prompts": lambda: dataset_rows.eval_rows(eval_specs),
    }
    files = {
        "sft": (cfg.sft_path, "data.sft_path", user_files.SFT_FIELDS),
        "preferences": (cfg.preference_path, "data.preference_path", user_files.PREFERENCE_FIELDS),
        "prompts": (cfg.prompt_path, "data.prompt_path", user_files.PROMPT_FIELDS),
        "eval_prompts": (cfg.eval_prompt_path, "data.eval_prompt_path", user_files.PROMPT_FIELDS),
    }
    rows, report, loaded = {}, {}, {}
    for name, (path, option, fields) in files.items():
        if path is not None:
            loaded[option] = user_files.load_rows(path, fields, option)
            rows[name] = loaded[option].rows
            report[name] = {
                "source": loaded[option].source,
                "format": loaded[option].format,
                "ignored_fields": list(loaded[option].ignored_fields),
            }
    conversational = _one_kind(loaded)
    for name, make in synthetic.items():
        if name not in rows:
            made = make()
            rows[name] = [_as_conversation(r) for r in made] if conversational else made
            report[name] = {"source": "synthetic", "format": _kind(conversational)}
    rows["preferences"], rows["preferences_eval"] = _split_pairs(
        rows["preferences"], eval_fraction, seed
    )
    report["preferences_eval"] = dict(report["preferences"], split_fraction=eval_fraction)
    return rows, report


def is_conversational(rows: dict[str, list[dict]]) -> bool:
    return any(chat.is_conversational(r["prompt"]) for dataset in rows.values() for r in dataset)


def _kind(conversational: bool) -> str:
    return "conversational" if conversational else "text"


def _one_kind(loaded: dict[str, user_files.LoadedRows]) -> bool:
    """Whether the run is conversational: all user files are, or none is (a policy trained on
    one rendering and prompted with another learns nothing useful, so mixing is refused)."""
    kinds = {option: rows.conversational for option, rows in loaded.items()}
    if len(set(kinds.values())) > 1:
        text = next(o for o, conv in kinds.items() if not conv)
        conv = next(o for o, conv in kinds.items() if conv)
        raise DataError(
            f"{conv} holds message lists but {text} holds text; expected every data file of "
            "a run in one kind, conversational or text"
        )
    return any(kinds.values())


def _as_conversation(row: dict) -> dict:
    """A synthetic text row as the conversational rows beside it: one user turn, one answer."""
    return {
        key: chat.user_message(value) if key == "prompt" else chat.assistant_message(value)
        for key, value in row.items()
    }


def _check_chat_template(tok: PreTrainedTokenizerBase, limits: Limits, cfg: Config) -> None:
    if limits.chat_template is None and not tok.chat_template:
        source = "the embedded base model" if cfg.model.is_embedded else cfg.model.name_or_path
        raise ConfigError(
            f"the data is conversational (message lists) but the tokenizer of {source} has no "
            "chat template; set data.chat_template to a Jinja template file (or --run.redo sft "
            "to rebuild an embedded base model built before rlhf-ray had one)"
        )


def _split_pairs(pairs: list[dict], fraction: float, seed: int) -> tuple[list, list]:
    if len(pairs) < 2:
        raise DataError(f"preferences: {len(pairs)} pair(s); at least 2 needed to hold some out")
    order = list(range(len(pairs)))
    random.Random(seed + 1).shuffle(order)
    n_eval = max(1, round(len(pairs) * fraction))
    if n_eval >= len(pairs):
        raise DataError(
            f"preferences: reward.eval_fraction={fraction} holds out {n_eval} of the "
            f"{len(pairs)} pairs, leaving none to train the reward model on; lower "
            "reward.eval_fraction or give more pairs"
        )
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def _base_model(cfg: Config, rows: dict, out: Path) -> tuple[PreTrainedTokenizerBase, str]:
    """The tokenizer and where SFT starts: a hub id/path (checked by `check_model_source` before
    the run prepares anything), or the embedded model in out/base."""
    if not cfg.model.is_embedded:
        name = cfg.model.name_or_path
        return _tokenizer_of(name, cfg.model.trust_remote_code, "model.name_or_path"), name
    base_dir = out / "base"
    # two passes over the rows (a digest, then BPE) rather than every text held at once
    settings = fingerprints.base_settings(cfg, _digest(_corpus(rows, cfg.data.prompt_template)))
    if base_dir.exists() and cfg.run.redo != "sft":
        # A rerun keeps the tokenizer the later phases were trained with, if it still fits.
        if fingerprints.read_record(out, "base") is None:
            raise ConfigError(
                f"{base_dir}: a base model with no record of the settings it was built with "
                "(an older rlhf-ray, or a run that died while building it); use a new "
                "run.output_dir, or --run.redo sft"
            )
        fingerprints.check_against_record(out, "base", settings, redo="sft")
        where = f"{base_dir} (built by an earlier run; --run.redo sft builds it again)"
        check_model_dir(base_dir, False, where)
        return _tokenizer_of(str(base_dir), False, where), str(base_dir)
    tok = train_bpe_tokenizer(_corpus(rows, cfg.data.prompt_template), cfg.model.vocab_size)
    max_positions = cfg.data.max_prompt_tokens + cfg.data.max_completion_tokens
    model = build_embedded_model(cfg.model, tok, max_positions, cfg.run.seed)
    # The old record goes first and the new one comes last: a base/ is never paired with the
    # record of another one, whenever this process dies.
    fingerprints.record_path(out, "base").unlink(missing_ok=True)
    with replace_dir(base_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    fingerprints.write_record(out, "base", settings)
    return tok, str(base_dir)


def _tokenizer_of(path: str, trust_remote_code: bool, where: str) -> PreTrainedTokenizerBase:
    try:
        return load_tokenizer(path, trust_remote_code)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds; name the source
        raise ConfigError(f"{where}: its tokenizer cannot be loaded ({err})") from err


def _digest(texts: Iterable[str]) -> str:
    """SHA-256 of the tokenizer's corpus, each text ended by a NUL (no text holds one)."""
    sha = hashlib.sha256()
    for text in texts:
        sha.update(text.encode("utf-8") + b"\0")
    return sha.hexdigest()


def _corpus(rows: dict, template: str):
    """Texts the embedded tokenizer learns from: every prompt (templated) and completion, each
    cut to its first _CORPUS_CHARS characters. Rows are cut to a few tokens later anyway, and
    BPE training slows down with the square of a long word's length (100,000 repeated
    characters take seconds, 300,000 minutes)."""
    for name, dataset in rows.items():
        for row in dataset:
            prompt = row["prompt"]
            if isinstance(prompt, str):
                yield template.format(prompt=prompt)[:_CORPUS_CHARS]
            else:
                yield from (f"{m['role']}: {m['content']}"[:_CORPUS_CHARS] for m in prompt)
            for key in _COMPLETION_FIELDS.get(name.removesuffix("_eval"), ()):
                for text in chat.message_texts(row[key]):
                    yield (" " + text)[:_CORPUS_CHARS]


def _apply_limits(name, dataset, tokenizer, limits: Limits, action: str):
    """(rows kept, number of over-length rows); rejects them when `action` is 'reject'."""
    keys = _COMPLETION_FIELDS.get(name.removesuffix("_eval"), ())
    flags = []
    for r in dataset:
        try:
            flags.append(is_overlong(tokenizer, r["prompt"], tuple(r[k] for k in keys), limits))
        except DataError as err:  # the chat template cannot render this row
            prompt = chat.prompt_text(r["prompt"])[:80]
            raise DataError(f"{name}: the row whose prompt is {prompt!r}: {err}") from err
    if action == "truncate":
        return dataset, sum(flags)
    kept = [row for row, long in zip(dataset, flags, strict=True) if not long]
    if not kept:
        raise DataError(
            f"{name}: all {len(dataset)} rows exceed data.max_prompt_tokens="
            f"{limits.max_prompt_tokens} or data.max_completion_tokens="
            f"{limits.max_completion_tokens}, and data.overlong is 'reject'"
        )
    return kept, sum(flags)
