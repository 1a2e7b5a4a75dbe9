"""Checkpoints that survive a kill or a full disk during their save.

transformers writes ``checkpoint-<step>`` file by file (weights, optimizer, scheduler, RNG state, trainer_state.json
last). A SIGKILL or a full disk in between leaves a partial folder that ``get_last_checkpoint`` still returns, and
resuming from it fails (or, for a folder re-saved over an older one, silently mixes two steps). FIPOTrainer.train
closes both holes with two narrow pieces:

* ``guard_checkpoint_saves``: every save first drops a marker file ``_saving_checkpoint-<step>`` next to the folder
  and removes it only once the whole save has finished and its files are flushed to disk. A folder whose marker is
  still there is partial, whatever files it holds.
* ``prepare_resume``: ``resume_from_checkpoint`` (True, "true", or a path) resolves to the newest *complete*
  checkpoint (``checkpoint_problems`` is empty), with a warning naming each partial one it skips. Partial folders
  newer than that are renamed ``incomplete-checkpoint-<step>`` (kept, never deleted), so the resumed run saves into
  fresh folders and checkpoint rotation (save_total_limit) cannot keep a partial folder as "the newest" and delete
  the complete ones.

Folders saved by older versions or other tools have no marker; for them completeness is decided from the files
alone (``checkpoint_problems``), including a cheap truncation check of safetensors and torch zip files.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # the pattern of transformers.trainer_utils.get_last_checkpoint
MARKER_PREFIX = "_saving_"  # "_*" files are left out of transformers' Hub uploads of output_dir
SET_ASIDE_PREFIX = "incomplete-"  # not "checkpoint-*": invisible to get_last_checkpoint and rotation

_INTERNAL_GONE = (
    "fipo_trl's checkpoint guard relies on transformers' Trainer.{name}, which {problem}. Install the transformers "
    "version fipo_trl supports (see pyproject.toml), or report this at fipo_trl."
)


# --- What a complete checkpoint is -------------------------------------------------------------------------------

def checkpoint_step(folder: str | os.PathLike) -> int | None:
    match = CHECKPOINT_RE.match(Path(folder).name)
    return int(match.group(1)) if match else None


def saving_marker(folder: str | os.PathLike) -> Path:
    """The file that exists while ``folder`` is being saved (a sibling, so it never lands in the checkpoint)."""
    folder = Path(folder)
    return folder.parent / f"{MARKER_PREFIX}{folder.name}"


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (None: fine). The header lists every tensor's byte range, so a file cut
    short by a kill or a full disk is caught without reading the tensors."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            if header_size > size:
                return f"{path.name} is truncated"
            header = json.loads(f.read(header_size))
        end = max((t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return f"{path.name} is unreadable (truncated?)"
    expected = 8 + header_size + end
    return None if size == expected else f"{path.name} is truncated ({size} of {expected} bytes)"


def _torch_file_problem(path: Path) -> str | None:
    """Why a torch.save file is unusable. torch writes a zip whose directory sits at the end of the file: a cut-off
    file has none. (A legacy pickle file can only be checked for being non-empty.)"""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as error:
        return f"{path.name} is unreadable ({error})"
    if not head:
        return f"{path.name} is empty"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return f"{path.name} is truncated"
    return None


def _file_problem(path: Path) -> str | None:
    return _safetensors_problem(path) if path.suffix == ".safetensors" else _torch_file_problem(path)


def _weights_problems(folder: Path) -> list[str]:
    problems, found = [], False
    for name in ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            found = True
            if problem := _file_problem(folder / name):
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
            problem = _file_problem(shard_path) if shard_path.is_file() else f"shard {shard} is missing"
            if problem:
                problems.append(problem)
    # Formats transformers also resumes from, checked for presence only: LoRA adapters in sub-folders, FSDP
    # (pytorch_model_fsdp*), DeepSpeed (global_step*, which holds the model and optimizer states).
    adapter_names = ("adapter_model.safetensors", "adapter_model.bin")
    for entry in folder.iterdir():
        if entry.name.startswith(("pytorch_model_fsdp", "global_step")) or (
                entry.is_dir() and any((entry / name).is_file() for name in adapter_names)):
            found = True
    return problems if found else problems + ["no model weights (model.safetensors, a sharded index, "
                                              "adapter_model.safetensors, FSDP or DeepSpeed states)"]


def _training_state_problems(folder: Path) -> list[str]:
    """Optimizer, scheduler and RNG state: what makes a resumed run continue the interrupted one."""
    problems = []
    deepspeed = any(folder.glob("global_step*"))  # DeepSpeed keeps optimizer (and its scheduler) in there
    # Other layouts: FSDP (optimizer.bin, optimizer_0/), XLA FSDP (rank*-of-*-optimizer.pt)
    other_optimizers = [*folder.glob("optimizer*"), *folder.glob("rank*-of-*-optimizer.pt")]
    if (folder / "optimizer.pt").is_file():
        if problem := _torch_file_problem(folder / "optimizer.pt"):
            problems.append(problem)
    elif not other_optimizers and not deepspeed:
        problems.append("optimizer.pt is missing")
    if (folder / "scheduler.pt").is_file():
        if problem := _torch_file_problem(folder / "scheduler.pt"):
            problems.append(problem)
    elif not deepspeed:
        problems.append("scheduler.pt is missing")
    rng_files = sorted(folder.glob("rng_state*.pth"))
    if not rng_files:
        problems.append("rng_state.pth is missing")
    problems += [p for p in map(_torch_file_problem, rng_files) if p]
    return problems


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
        if other.name != "trainer_state.json" and not other.name.endswith(".index.json"):
            try:
                json.loads(other.read_text())
            except (OSError, ValueError):
                problems.append(f"{other.name} is unreadable (truncated?)")
    problems += _weights_problems(folder)
    if training_state:
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


# --- Resuming ----------------------------------------------------------------------------------------------------

def _describe(skipped) -> str:
    return "; ".join(f"{path} ({', '.join(problems)})" for path, problems in skipped)


def resolve_resume(resume, output_dir, training_state: bool = True) -> tuple[str | None, list[str]]:
    """The checkpoint to resume from for ``train(resume_from_checkpoint=resume)``, and the warnings to show.

    True (or the string "true", as ``--resume_from_checkpoint true`` passes it): the newest complete checkpoint in
    output_dir. A path: that checkpoint if complete, else the newest complete one before it in the same folder.
    Raises ValueError (naming resume_from_checkpoint and the fix) when there is none.
    """
    if isinstance(resume, str) and resume.strip().lower() in ("true", "false") and not os.path.exists(resume):
        resume = resume.strip().lower() == "true"  # `--resume_from_checkpoint true` arrives as a string
    if resume is None or resume is False:
        return None, []
    if resume is True:
        folder, wanted = Path(output_dir), None
        if not list_checkpoints(folder):
            raise ValueError(
                f"resume_from_checkpoint=True, but output_dir {str(folder)!r} holds no checkpoint-<step> folder. "
                "Fix: set --output_dir to the interrupted run's output_dir, or drop --resume_from_checkpoint to "
                "start from scratch.")
    else:
        wanted = Path(resume)
        if not wanted.is_dir():
            raise ValueError(
                f"resume_from_checkpoint={str(resume)!r} does not exist (or is not a folder). Fix: pass one of the "
                "run's checkpoint-<step> folders, or `true` for the newest complete checkpoint in --output_dir.")
        problems = checkpoint_problems(wanted, training_state)
        if not problems:
            return str(wanted), []
        folder = wanted.parent
    below = None if wanted is None else checkpoint_step(wanted)
    chosen, skipped = newest_complete_checkpoint(folder, training_state, below)
    if wanted is not None:
        skipped.insert(0, (wanted, problems))
    if chosen is None:
        raise ValueError(
            f"resume_from_checkpoint: no complete checkpoint to resume from; partial (a kill or a full disk during "
            f"the save): {_describe(skipped)}. Fix: point --resume_from_checkpoint at a complete checkpoint, or drop "
            "it to start from scratch.")
    return str(chosen), [
        f"resume_from_checkpoint: skipping the partial checkpoint {path} ({', '.join(problems)}; its save was cut "
        f"short, e.g. by a kill or a full disk). Resuming from {chosen}, the newest complete checkpoint."
        for path, problems in skipped]


def set_aside_incomplete(output_dir, after_step: int, training_state: bool = True) -> list[str]:
    """Rename the partial checkpoint folders of output_dir newer than ``after_step`` to incomplete-checkpoint-<step>
    (kept for inspection, never deleted): the resumed run then saves into fresh folders instead of mixing its files
    with stale ones, and rotation never keeps a partial folder as the newest checkpoint. Returns the warnings."""
    messages = []
    for checkpoint in list_checkpoints(output_dir):
        if checkpoint_step(checkpoint) <= after_step:
            continue
        problems = checkpoint_problems(checkpoint, training_state)
        if not problems:
            continue
        target, n = checkpoint.with_name(SET_ASIDE_PREFIX + checkpoint.name), 1
        while target.exists():
            target, n = checkpoint.with_name(f"{SET_ASIDE_PREFIX}{checkpoint.name}.{n}"), n + 1
        checkpoint.rename(target)
        saving_marker(checkpoint).unlink(missing_ok=True)
        messages.append(f"Moved the partial checkpoint {checkpoint} ({', '.join(problems)}) to {target}: new saves "
                        "and checkpoint rotation ignore it. Delete it once you no longer need it.")
    for marker in Path(output_dir).glob(f"{MARKER_PREFIX}checkpoint-*"):  # markers whose folder is gone
        if not marker.with_name(marker.name[len(MARKER_PREFIX):]).exists():
            marker.unlink(missing_ok=True)
    return messages


def prepare_resume(trainer, resume):
    """Resolve ``resume_from_checkpoint`` for ``trainer.train`` (see ``resolve_resume``) and set partial checkpoints
    aside. The main process decides and every process gets its answer, so all resume from the same folder."""
    training_state = not trainer.args.save_only_model
    result = None
    if trainer.accelerator.is_main_process:
        try:
            checkpoint, messages = resolve_resume(resume, trainer.args.output_dir, training_state)
            step = 0
            if checkpoint is not None:
                state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
                step = state["global_step"]
            messages += set_aside_incomplete(trainer.args.output_dir, step, training_state)
            for message in messages:
                warnings.warn(message, UserWarning, stacklevel=3)
            result = ("ok", checkpoint)
        except Exception as error:  # noqa: BLE001 - re-raised below, on every process (none is left waiting)
            result = ("error", error)
    if trainer.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        result = broadcast_object_list([result])[0]  # also keeps the others waiting until the renames are done
    if result[0] == "error":
        raise result[1]
    return result[1]


# --- Saving ------------------------------------------------------------------------------------------------------

def _fsync_tree(folder: Path) -> None:
    """Flush the checkpoint's files to disk before its marker goes: a cleared marker means the data is there."""
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass  # some filesystems refuse fsync on read-only descriptors; the data is still written
            finally:
                os.close(fd)


@contextmanager
def guard_checkpoint_saves(trainer):
    """While active, each checkpoint save is bracketed by its ``_saving_checkpoint-<step>`` marker (see the module
    docstring). Wraps the instance's ``_save_checkpoint`` (a transformers internal; checked, with a clear error if it
    is gone or no longer saves to ``<output_dir>/checkpoint-<global_step>``)."""
    for name in ("_save_checkpoint", "_get_output_dir"):
        if not callable(getattr(trainer, name, None)):
            raise RuntimeError(_INTERNAL_GONE.format(name=name, problem="this transformers version does not have"))
    original = trainer._save_checkpoint
    shadowed = "_save_checkpoint" in vars(trainer)

    def save_checkpoint(model, trial, *args, **kwargs):
        folder = Path(trainer._get_output_dir(trial=trial)) / f"checkpoint-{trainer.state.global_step}"
        marker = saving_marker(folder)
        main = trainer.args.should_save
        if main:
            marker.parent.mkdir(parents=True, exist_ok=True)
            with marker.open("w") as f:
                f.write(f"fipo_trl is saving {folder.name}. If this file is still here, that save never finished "
                        f"and {folder.name} is incomplete: resuming skips it.\n")
                f.flush()
                os.fsync(f.fileno())
        try:
            original(model, trial, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - re-raised, with what happened to the checkpoint
            newest, _ = newest_complete_checkpoint(folder.parent, not trainer.args.save_only_model)
            error.add_note(
                f"fipo_trl: saving {folder} failed, so that folder is incomplete (marked by {marker.name}): resuming "
                f"skips it and uses the newest complete checkpoint ({newest or 'none yet'}). If the disk is full, "
                "free space (or lower save_total_limit), then rerun with --resume_from_checkpoint true.")
            raise
        trainer.accelerator.wait_for_everyone()  # every process has written its part (e.g. its RNG state)
        if main:
            if not (folder / "trainer_state.json").is_file():
                raise RuntimeError(_INTERNAL_GONE.format(
                    name="_save_checkpoint", problem=f"did not write {folder / 'trainer_state.json'} as expected"))
            _fsync_tree(folder)
            marker.unlink(missing_ok=True)

    trainer._save_checkpoint = save_checkpoint  # instance attribute: shadows the class method for this trainer only
    try:
        yield
    finally:
        if shadowed:
            trainer._save_checkpoint = original
        else:
            del trainer._save_checkpoint


class SafeCheckpointsMixin:
    """Mix in before ``transformers.Trainer`` (FIPOTrainer does): ``train`` becomes safe against checkpoints cut
    short by a kill or a full disk. Resuming (True, "true" or a path) uses the newest *complete* checkpoint and warns
    about each partial one it skips, and every save is marked in progress until it has finished. Nothing here is
    specific to FIPO."""

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        resume_from_checkpoint = prepare_resume(self, resume_from_checkpoint)
        with guard_checkpoint_saves(self):
            return super().train(resume_from_checkpoint, *args, **kwargs)
