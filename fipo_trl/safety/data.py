"""Training and evaluation data: the one table of local data files, and the checks that run before the model loads.

``fipo-trl train`` and ``fipo-trl eval`` read local files through ``data_file_builder`` (the datasets builder of a
file, compressed ones included) and ``check_data_file`` (a damaged file named with its line, before datasets reads
it). ``check_train_dataset`` and ``check_training_data`` check a training dataset before the model loads: its
columns, its size, and its prompts (``prompts.py``). Every failure is a ValueError naming the file, row or column,
and the fix.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import os
from pathlib import Path

from fipo_trl.safety.prompts import (
    absolute_position_limit,
    check_content_parts,
    check_prompt_lengths,
    check_prompts,
    rotary_position_limit,
    warn_past_rotary_positions,
)

# Local data files load_dataset reads, by suffix (a single file: datasets names its only split "train").
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
# Compressions datasets decompresses on the fly (for the text formats json and csv).
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# Arguments TRL passes to every reward function itself: a dataset column of the same name would clash
# (GRPOTrainer._calculate_rewards passes each other column as a keyword argument).
RESERVED_COLUMNS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
                    "environments")
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_config.json")


def _suffixes(path: Path) -> tuple[str, str | None]:
    """(the data suffix, the compression suffix or None): 'x.jsonl.gz' -> ('.jsonl', '.gz')."""
    suffix = path.suffix.lower()
    if suffix in COMPRESSIONS:
        return Path(path.stem).suffix.lower(), suffix
    return suffix, None


def data_file_builder(path: str | os.PathLike) -> str | None:
    """The datasets builder that reads ``path`` ('json', 'csv', 'parquet', 'arrow'), or None for another kind of
    file. Compressed JSON and CSV (``.jsonl.gz``, ``.csv.bz2``, ``.json.xz``) are read too, as datasets does."""
    suffix, compression = _suffixes(Path(path))
    builder = DATA_FILE_BUILDERS.get(suffix)
    if compression and builder not in ("json", "csv"):
        return None
    return builder


def supported_files() -> str:
    return ", ".join([*DATA_FILE_BUILDERS, ".jsonl.gz (or .bz2, .xz: compressed JSON / CSV)"])


def is_model_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and any((path / f).exists() for f in MODEL_FILES)


def _open_text_lines(path: Path):
    suffix, compression = _suffixes(path)
    opener = COMPRESSIONS[compression] if compression else open
    return opener(path, "rb")


def check_data_file(path: str | os.PathLike, flag: str) -> None:
    """Read a local JSON / JSON-lines / CSV file once and refuse what datasets would report badly or late: a file
    with no rows (a raw StopIteration), a line that is not JSON (no file or line named), a row that is not UTF-8
    (read lazily: it fails steps later), one JSON object of columns (read as a single row), and a CSV header with a
    repeated column (pandas renames the second 'prompt' to 'prompt.1' and trains on the first)."""
    path = Path(path)
    builder = data_file_builder(path)
    if builder not in ("json", "csv"):
        return  # parquet and arrow carry their own schema and checksums
    where = f"{flag} {str(path)!r}"
    try:
        with _open_text_lines(path) as f:
            raw_lines = f.read().splitlines()
    except (OSError, EOFError, lzma.LZMAError) as error:
        raise ValueError(f"{where}: cannot be read ({error}). Fix: check the file (a compressed file cut short?)."
                         ) from None
    lines = []
    for number, raw in enumerate(raw_lines, 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"{where}, line {number}: not UTF-8 text (byte {raw[error.start]:#04x} at column "
                             f"{error.start + 1}). Fix: re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
                             ) from None
    if not any(line.strip() for line in lines):
        raise ValueError(f"{where}: the file has no rows. Fix: point it at the data file with the prompts.")
    if builder == "csv":
        header = next(csv.reader(io.StringIO(next(line for line in lines if line.strip()))))
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise ValueError(f"{where}: the header repeats the column(s) {repeated} (columns: {header}); only one "
                             "of each would be used. Fix: rename or remove the duplicate column.")
        return
    text = "\n".join(lines)
    if _suffixes(path)[0] == ".json":
        try:
            document = json.loads(text)
        except ValueError:
            document = None  # not one JSON document: JSON lines in a .json file, checked line by line below
        if isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
            raise ValueError(f"{where}: the file is one JSON object of columns ({sorted(document)[:5]}), which "
                             "datasets reads as a single row. Fix: write one JSON object per row, as JSON lines "
                             '({"prompt": ...} per line) or a JSON list of objects.')
        if document is not None:
            _check_unicode(document, where)
            return
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{where}, line {number}: not valid JSON ({error}): {line[:80]!r}. Fix: repair or "
                             "remove that line (JSON lines: one complete object per line).") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}, line {number}: a JSON {type(row).__name__}, not an object with named "
                             'columns. Fix: write each row as an object, e.g. {"prompt": "...", "answer": "..."}.')
        _check_unicode(row, f"{where}, line {number}")


def _check_unicode(value, where: str) -> None:
    """A lone surrogate escape ("\\ud800") is valid JSON but not Unicode text: datasets fails on it with a raw
    DatasetGenerationError, naming neither the file nor the line."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        bad = error.object[error.start:error.end].encode("unicode_escape").decode()
        raise ValueError(f"{where}: holds a lone surrogate escape ({bad}), valid JSON but not Unicode text, which "
                         "datasets cannot store. Fix: remove or replace it (e.g. with \\ufffd), or write the text "
                         "as UTF-8 without escapes.") from None


def check_dataset_source(name: str, flag: str = "--dataset_name") -> None:
    """Refuse a model folder given where a dataset goes: datasets would read its config and tokenizer JSON as data."""
    if is_model_folder(name):
        raise ValueError(f"{flag} {name!r} is a model folder (config.json and weights), not a dataset. Fix: pass it "
                         "as --model_name_or_path, and the data file or dataset folder as --dataset_name.")


# --- The training dataset, before the model loads -----------------------------------------------------------

def check_train_dataset(dataset, args) -> None:
    """Fail before the model loads on a dataset TRL would only reject deep inside training, or train 0 steps on."""
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, list) and "prompt" not in columns:
        raise ValueError(f"train_dataset has no 'prompt' column (its columns: {columns}). Fix: rename the column that "
                         "holds the prompts, e.g. dataset.rename_column('question', 'prompt'), or in a recipe's "
                         "`datasets:` entry select it with `columns:` after renaming it in the data.")
    try:
        size = len(dataset)
    except TypeError:  # an IterableDataset (streaming): its size is unknown
        return
    needed = args.generation_batch_size // args.num_generations
    if size < needed:
        raise ValueError(
            f"train_dataset has {size} prompts, but one generation batch takes {needed}: generation_batch_size "
            f"{args.generation_batch_size} (per_device_train_batch_size {args.per_device_train_batch_size} x "
            f"{args.world_size} processes x steps_per_generation {args.steps_per_generation}) / num_generations "
            f"{args.num_generations}. Training would run 0 steps. Fix: add prompts, or lower "
            "per_device_train_batch_size or fipo_updates_per_generation (steps_per_generation), or raise "
            "num_generations.")


def _model_config(model, args):
    """The model's config without loading its weights (None when it cannot be read: TRL reports that itself)."""
    if not isinstance(model, str):
        return getattr(model, "config", None)
    from transformers import AutoConfig

    kwargs = args.model_init_kwargs or {}
    try:
        return AutoConfig.from_pretrained(model, revision=kwargs.get("revision"),
                                          trust_remote_code=args.trust_remote_code)
    except Exception:  # noqa: BLE001 - a missing or remote model is reported by the model load, with its own error
        return None


def check_training_data(dataset, args, model=None, reward_funcs=None, processing_class=None) -> None:
    """What FIPOTrainer checks in the training data before the model loads, beyond the 'prompt' column itself:
    no column named like an argument TRL passes to the reward functions; the reference-answer column that
    math_verify_reward reads; every prompt (``check_prompts``); and, for a model with an absolute position table,
    every prompt's length (``check_prompt_lengths``). An iterable (streaming) dataset is read lazily: only its
    columns are checked."""
    columns = getattr(dataset, "column_names", None) or []
    clashes = [name for name in columns if name in RESERVED_COLUMNS]
    if clashes:
        raise ValueError(f"train_dataset has the column(s) {clashes}, a name TRL already passes to every reward "
                         f"function (reserved: {list(RESERVED_COLUMNS)}); the reward call would fail with 'got "
                         "multiple values for keyword argument'. Fix: rename the column, e.g. "
                         f"dataset.rename_column({clashes[0]!r}, 'reference_{clashes[0]}').")
    from fipo_trl.rewards import MathVerifyReward

    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    references = ("solution", "answer", "reward_model")
    if columns and any(isinstance(f, MathVerifyReward) for f in funcs) and not set(references) & set(columns):
        raise ValueError(f"math_verify_reward needs a reference answer column, one of {list(references)} "
                         f"(reward_model: verl's dict with 'ground_truth'), but train_dataset's columns are "
                         f"{columns}. Fix: rename the column that holds the answers, e.g. "
                         "dataset.rename_column('label', 'answer').")
    if "prompt" not in columns or not hasattr(dataset, "__len__"):
        return
    prompts = dataset["prompt"]
    check_prompts(prompts)
    config = _model_config(model, args) if model is not None else None
    if config is not None:
        check_content_parts(prompts, config)
    limit = absolute_position_limit(config) if config is not None else None
    rotary_limit = rotary_position_limit(config) if config is not None and limit is None else None
    if limit is None and rotary_limit is None:
        return
    tokenizer = processing_class
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model if isinstance(model, str) else config._name_or_path)
        except Exception:  # noqa: BLE001 - no tokenizer to measure with: TRL's own load reports it
            return
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if limit is not None:
        check_prompt_lengths(prompts, tokenizer, limit, args.max_completion_length)
    else:
        warn_past_rotary_positions(prompts, tokenizer, rotary_limit, args.max_completion_length)
