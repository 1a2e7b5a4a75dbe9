"""What a complete checkpoint is: the one question every resume, eval and rotation decision asks.

transformers writes ``checkpoint-<step>`` file by file (weights, optimizer, scheduler, RNG state, trainer_state.json
last). A SIGKILL or a full disk in between leaves a partial folder that ``get_last_checkpoint`` still returns.
``checkpoint_problems`` says why a folder cannot be resumed from (an empty list: complete): the save-in-progress
marker that ``saving.py`` drops next to each folder, then the files themselves, by their contents (``shard_files.py``:
safetensors, torch zip files, FSDP's DCP shards, DeepSpeed's partitions), for folders saved by older versions or other
tools. A finished
``save_only_model`` save is complete as a model, not partial (``MODEL_ONLY``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from fipo_trl.safety.run_settings import RUN_SETTINGS_FILE
from fipo_trl.safety.shard_files import dcp_problems, deepspeed_problems, file_problem, torch_file_problem

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # the pattern of transformers.trainer_utils.get_last_checkpoint
MARKER_PREFIX = "_saving_"  # "_*" files are left out of transformers' Hub uploads of output_dir


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    match = CHECKPOINT_RE.match(Path(folder).name)
    return int(match.group(1)) if match else None


def saving_marker(folder: str | os.PathLike) -> Path:
    """The file that exists while ``folder`` is being saved (a sibling, so it never lands in the checkpoint)."""
    folder = Path(folder)
    return folder.parent / f"{MARKER_PREFIX}{folder.name}"


def _weights_problems(folder: Path, training_state: bool) -> list[str]:
    problems, found = [], False
    for name in ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            found = True
            if problem := file_problem(folder / name):
                problems.append(problem)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if not index.is_file():
            continue
        found = True
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            problems.append(f"{index_name} is unreadable (truncated?)")
            continue
        for shard in shards:
            shard_path = folder / shard
            problem = file_problem(shard_path) if shard_path.is_file() else f"shard {shard} is missing"
            if problem:
                problems.append(problem)
    adapter_names = ("adapter_model.safetensors", "adapter_model.bin")
    for entry in folder.iterdir():
        if entry.is_dir() and any((entry / name).is_file() for name in adapter_names):  # LoRA, in a sub-folder
            found = True
            problems += [p for name in adapter_names if (entry / name).is_file() and (p := file_problem(entry / name))]
        elif entry.name.startswith("pytorch_model_fsdp"):  # FSDP: a full state dict file, or DCP shards
            found = True
            problems += dcp_problems(entry) if entry.is_dir() else [p for p in [torch_file_problem(entry)] if p]
    if (folder / "latest").is_file() or any(folder.glob("global_step*")):  # DeepSpeed: model and optimizer states
        found = True
        problems += deepspeed_problems(folder, training_state, saved_world_size(folder))
    return problems if found else problems + ["no model weights (model.safetensors, a sharded index, "
                                              "adapter_model.safetensors, FSDP or DeepSpeed states)"]


def saved_world_size(folder: Path) -> int | None:
    """The number of processes that saved the checkpoint: each writes its rng_state_<rank>.pth."""
    ranks = [int(m.group(1)) for path in folder.glob("rng_state_*.pth")
             if (m := re.match(r"rng_state_(\d+)", path.name))]
    return max(ranks) + 1 if ranks else None


def _training_state_problems(folder: Path) -> list[str]:
    """Optimizer, scheduler and RNG state: what makes a resumed run continue the interrupted one."""
    problems = []
    deepspeed = any(folder.glob("global_step*"))  # DeepSpeed keeps optimizer (and its scheduler) in there
    # Other layouts: FSDP (optimizer.bin, optimizer_0/), XLA FSDP (rank*-of-*-optimizer.pt)
    other_optimizers = [*folder.glob("optimizer*"), *folder.glob("rank*-of-*-optimizer.pt")]
    if (folder / "optimizer.pt").is_file():
        if problem := torch_file_problem(folder / "optimizer.pt"):
            problems.append(problem)
    elif not other_optimizers and not deepspeed:
        problems.append("optimizer.pt is missing")
    for entry in folder.glob("optimizer_*"):  # FSDP's sharded optimizer state (DCP)
        if entry.is_dir():
            problems += dcp_problems(entry)
    if (folder / "optimizer.bin").is_file() and (problem := torch_file_problem(folder / "optimizer.bin")):
        problems.append(problem)  # FSDP's full optimizer state
    if (folder / "scheduler.pt").is_file():
        if problem := torch_file_problem(folder / "scheduler.pt"):
            problems.append(problem)
    elif not deepspeed:
        problems.append("scheduler.pt is missing")
    rng_files = sorted(folder.glob("rng_state*.pth"))
    if not rng_files:
        problems.append("rng_state.pth is missing")
    problems += [p for p in map(torch_file_problem, rng_files) if p]
    return problems


MODEL_ONLY = ("saved with save_only_model=True: model weights and trainer state only, no optimizer, scheduler or "
              "RNG state")


def _has_training_state_files(folder: Path) -> bool:
    patterns = ("optimizer*", "scheduler.pt", "rng_state*.pth", "rank*-of-*-optimizer.pt", "global_step*")
    return any(any(folder.glob(pattern)) for pattern in patterns)


def is_model_only(problems: list[str]) -> bool:
    """Whether ``checkpoint_problems`` found a complete ``save_only_model`` checkpoint (not a partial one)."""
    return problems == [MODEL_ONLY]


def checkpoint_problems(folder: str | os.PathLike, training_state: bool = True) -> list[str]:
    """Why ``folder`` cannot be resumed from; an empty list means it is complete.

    Complete: no save-in-progress marker; trainer_state.json present and parseable (and every other JSON file
    parseable); model weights present and not
    truncated (model.safetensors, a sharded index with all its shards, adapter_model.safetensors for LoRA, or FSDP /
    DeepSpeed states); and, unless ``training_state`` is False (``save_only_model``), optimizer.pt, scheduler.pt and
    the RNG state(s), none truncated.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = []
    if saving_marker(folder).exists():
        problems.append(f"its save never finished ({saving_marker(folder).name} is still there)")
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            problems.append("trainer_state.json has no global_step")
    except FileNotFoundError:
        problems.append("trainer_state.json is missing")
    except (OSError, ValueError):
        problems.append("trainer_state.json is unreadable (truncated?)")
    for other in sorted(folder.glob("*.json")):  # config, tokenizer, TRL / fipo_trl states: cut-off JSON is caught
        # the settings record is fipo_trl's note about the run, not state to resume: unreadable means "settings
        # unknown" (a warning at resume), never a partial checkpoint
        if other.name not in ("trainer_state.json", RUN_SETTINGS_FILE) and not other.name.endswith(".index.json"):
            try:
                json.loads(other.read_text())
            except (OSError, ValueError):
                problems.append(f"{other.name} is unreadable (truncated?)")
    problems += _weights_problems(folder, training_state)
    if training_state:
        if not problems and not _has_training_state_files(folder):
            # transformers writes trainer_state.json last: a finished save without any of these is model-only
            return [MODEL_ONLY]
        problems += _training_state_problems(folder)
    return problems


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-<step>`` folders in ``folder``, oldest (lowest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if checkpoint_step(p) is not None and p.is_dir()]
    return sorted(found, key=checkpoint_step)


def newest_complete_checkpoint(folder, training_state: bool = True, below_step: int | None = None):
    """(newest complete checkpoint in ``folder`` or None, [(partial checkpoint, its problems)] newer than it)."""
    skipped = []
    for checkpoint in reversed(list_checkpoints(folder)):
        if below_step is not None and checkpoint_step(checkpoint) >= below_step:
            continue
        problems = checkpoint_problems(checkpoint, training_state)
        if not problems:
            return checkpoint, skipped
        skipped.append((checkpoint, problems))
    return None, skipped

