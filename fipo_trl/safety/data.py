"""Training and evaluation data: the one table of local data files, and the checks that run before the model loads.

``fipo-trl train`` and ``fipo-trl eval`` read local files through ``data_file_builder`` (the datasets builder of a
file, compressed ones included) and ``check_data_file`` (a damaged file named with its line, before datasets reads
it). ``check_prompts`` checks the prompt column of a training dataset (FIPOTrainer runs it before the model loads),
``check_prompt_lengths`` the prompts against a model's absolute position table. Every failure is a ValueError naming
the file, row or column, and the fix.
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


def check_dataset_source(name: str, flag: str = "--dataset_name") -> None:
    """Refuse a model folder given where a dataset goes: datasets would read its config and tokenizer JSON as data."""
    if is_model_folder(name):
        raise ValueError(f"{flag} {name!r} is a model folder (config.json and weights), not a dataset. Fix: pass it "
                         "as --model_name_or_path, and the data file or dataset folder as --dataset_name.")


# --- The prompts -------------------------------------------------------------------------------------------------

def _prompt_problem(prompt) -> tuple[str | None, str | None]:
    """(the prompt's kind, 'text' or 'chat', or None, and what is wrong with it, or None)."""
    if isinstance(prompt, str):
        return "text", None if prompt.strip() else "empty text"
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            return "chat", "an empty message list"
        for j, message in enumerate(prompt):
            if not isinstance(message, dict):
                return "chat", f"message {j} is a {type(message).__name__}, not a {{'role', 'content'}} dict"
            missing = [key for key in ("role", "content") if key not in message or message[key] is None]
            if missing:
                return "chat", f"message {j} has no {' or '.join(repr(k) for k in missing)} (keys: {sorted(message)})"
        return "chat", None
    return None, f"a {type(prompt).__name__} ({prompt!r:.40}), not text or a list of chat messages"


def check_prompts(prompts, what: str = "train_dataset") -> str | None:
    """Check every prompt: text or chat messages (each with 'role' and 'content'), not empty, and one format for
    the whole dataset (TRL decides the format from the first row). Returns the format, 'text' or 'chat'."""
    first_of_kind: dict[str, int] = {}
    try:
        for i, prompt in enumerate(prompts):
            kind, problem = _prompt_problem(prompt)
            if problem:
                raise ValueError(f"{what}: row {i}'s 'prompt': {problem}. Fix: give every row a non-empty prompt "
                                 "(a text, or a list of {'role': ..., 'content': ...} messages), or drop the row.")
            first_of_kind.setdefault(kind, i)
            if len(first_of_kind) > 1:
                raise ValueError(f"{what}: rows mix text prompts (row {first_of_kind['text']}) and chat-message "
                                 f"prompts (row {first_of_kind['chat']}); TRL formats every row like the first. Fix: "
                                 "use one format, e.g. wrap each text as [{'role': 'user', 'content': text}].")
    except UnicodeDecodeError as error:  # datasets decodes a JSON row lazily
        raise ValueError(f"{what}: a prompt is not UTF-8 text ({error}). Fix: re-save the data as UTF-8.") from None
    return next(iter(first_of_kind), None)


def absolute_position_limit(config) -> int | None:
    """The size of the model's learned absolute position table (GPT-2, OPT, ...), or None: rotary (RoPE) and ALiBi
    models have no table to index past, so no hard limit."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    settings = config.to_dict()
    if any("rope" in key or "rotary" in key or "alibi" in key for key in settings):
        return None
    if settings.get("position_embedding_type", "absolute") != "absolute":
        return None
    return limit


def check_prompt_lengths(prompts, tokenizer, limit: int, max_completion_length: int,
                         what: str = "train_dataset") -> None:
    """Each prompt plus max_completion_length tokens must fit the model's absolute position table, or generation
    fails with an IndexError inside the embedding."""
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            n = len(tokenizer(prompt)["input_ids"])
        else:
            n = len(tokenizer.apply_chat_template(list(prompt), tokenize=True, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])
        if n + max_completion_length > limit:
            raise ValueError(
                f"{what}: row {i}'s prompt is {n} tokens; with max_completion_length {max_completion_length} that is "
                f"{n + max_completion_length} positions, but the model's position table has {limit} "
                "(max_position_embeddings). Fix: shorten or drop the long prompts, or lower max_completion_length "
                f"to at most {max(limit - n, 0)}.")


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
    limit = absolute_position_limit(config) if config is not None else None
    if limit is None:
        return
    tokenizer = processing_class
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model if isinstance(model, str) else config._name_or_path)
        except Exception:  # noqa: BLE001 - no tokenizer to measure with: TRL's own load reports it
            return
    check_prompt_lengths(prompts, getattr(tokenizer, "tokenizer", tokenizer), limit, args.max_completion_length)
