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
alone (``checkpoint_problems``), including a cheap truncation check of safetensors and torch zip files. A finished
``save_only_model`` save is complete as a model, not partial (``MODEL_ONLY``).

``train`` also keeps one run per output_dir: the main process holds ``_fipo_trl_run.lock`` in it for the run
(``acquire_output_dir_lock``), and a run that does not resume refuses another run's checkpoints
(``check_fresh_output_dir``). Each checkpoint records the run's settings (``fipo_run_settings.json``); a resume
refuses another architecture or dynamic-sampling seed and warns about every other change (``compare_run_settings``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import time
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
        if other.name != "trainer_state.json" and not other.name.endswith(".index.json"):
            try:
                json.loads(other.read_text())
            except (OSError, ValueError):
                problems.append(f"{other.name} is unreadable (truncated?)")
    problems += _weights_problems(folder)
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


# --- Resuming ----------------------------------------------------------------------------------------------------

def _describe(skipped) -> str:
    return "; ".join(f"{path} ({', '.join(problems)})" for path, problems in skipped)


def _model_only_error(path) -> ValueError:
    return ValueError(
        f"resume_from_checkpoint: {path} was {MODEL_ONLY}, so training cannot continue exactly from it. Fix: add "
        "--save_only_model true to resume from it anyway (the weights and the step count carry on; the optimizer "
        f"moments, the learning-rate schedule and the RNG start afresh), or start a new run from its weights with "
        f"--model_name_or_path {path}.")


def _skip_message(path, problems, chosen) -> str:
    if is_model_only(problems):
        return (f"resume_from_checkpoint: skipping {path}, {MODEL_ONLY} (this run saves the full training state). "
                f"Resuming from {chosen}, the newest complete checkpoint.")
    return (f"resume_from_checkpoint: skipping the partial checkpoint {path} ({', '.join(problems)}; its save was cut "
            f"short, e.g. by a kill or a full disk). Resuming from {chosen}, the newest complete checkpoint.")


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
        if checkpoint_step(wanted) is None and list_checkpoints(wanted):  # a run's output_dir, not a checkpoint
            notes = [f"resume_from_checkpoint={str(resume)!r} is a run's output_dir, not one of its checkpoints: "
                     "resuming from its newest complete checkpoint."]
            checkpoint, messages = resolve_resume(True, wanted, training_state)
            return checkpoint, notes + messages
        problems = checkpoint_problems(wanted, training_state)
        if not problems:
            return str(wanted), []
        if is_model_only(problems):
            raise _model_only_error(wanted)
        if checkpoint_step(wanted) is None and not (wanted / "trainer_state.json").exists():
            raise ValueError(
                f"resume_from_checkpoint={str(resume)!r} is not a checkpoint: it has no trainer_state.json and no "
                "checkpoint-<step> folders (a saved model, or another folder). Fix: pass one of a run's "
                "checkpoint-<step> folders (or `true` for the newest in --output_dir); to start a new run from a "
                "saved model, pass it as --model_name_or_path instead.")
        folder = wanted.parent
    below = None if wanted is None else checkpoint_step(wanted)
    chosen, skipped = newest_complete_checkpoint(folder, training_state, below)
    if wanted is not None:
        skipped.insert(0, (wanted, problems))
    if chosen is None:
        if skipped and all(is_model_only(problems) for _, problems in skipped):
            raise _model_only_error(skipped[0][0])
        raise ValueError(
            f"resume_from_checkpoint: no complete checkpoint to resume from; partial (a kill or a full disk during "
            f"the save) or model-only: {_describe(skipped)}. Fix: point --resume_from_checkpoint at a complete "
            "checkpoint, or drop it to start from scratch.")
    return str(chosen), [_skip_message(path, problems, chosen) for path, problems in skipped]


def set_aside_incomplete(output_dir, after_step: int, training_state: bool = True) -> list[str]:
    """Rename the partial checkpoint folders of output_dir newer than ``after_step`` to incomplete-checkpoint-<step>
    (kept for inspection, never deleted): the resumed run then saves into fresh folders instead of mixing its files
    with stale ones, and rotation never keeps a partial folder as the newest checkpoint. Returns the warnings."""
    messages = []
    for checkpoint in list_checkpoints(output_dir):
        if checkpoint_step(checkpoint) <= after_step:
            continue
        problems = checkpoint_problems(checkpoint, training_state)
        if not problems or is_model_only(problems):  # a finished save_only_model save is not partial
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
    aside. The main process takes the output_dir lock, refuses (or, with overwrite_output_dir, moves) another run's
    checkpoints for a fresh run, and compares a resumed checkpoint's settings with the run's; every process gets its
    answer, so all resume from the same folder, or all raise the same error."""
    args = trainer.args
    training_state = not args.save_only_model
    result = None
    if trainer.accelerator.is_main_process:
        locked = False
        try:
            acquire_output_dir_lock(args.output_dir)  # held until train() ends (release_output_dir_lock)
            locked = True
            checkpoint, messages = resolve_resume(resume, args.output_dir, training_state)
            step = 0
            trainer._fipo_resume_history = []
            if checkpoint is None:
                messages += check_fresh_output_dir(args.output_dir, getattr(args, "overwrite_output_dir", False))
            else:
                check_resume_before_load(checkpoint, args, trainer.accelerator.unwrap_model(trainer.model).config)
                state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
                step = state["global_step"]
                saved = read_run_settings(checkpoint)
                trainer._fipo_resume_history = list((saved or {}).get("resumed", []))
                changes = compare_run_settings(saved, run_settings(trainer))
                if changes:
                    trainer._fipo_resume_history.append({"step": step, "changes": changes})
                    messages.append(f"resume_from_checkpoint: {checkpoint} was saved with other settings: "
                                    f"{'; '.join(changes)}. The run continues with the new ones; the model card "
                                    "records the change.")
            messages += set_aside_incomplete(args.output_dir, step, training_state)
            for message in messages:
                warnings.warn(message, UserWarning, stacklevel=3)
            result = ("ok", checkpoint)
        except Exception as error:  # noqa: BLE001 - re-raised below, on every process (none is left waiting)
            if locked:
                release_output_dir_lock(args.output_dir)
            result = ("error", error)
    if trainer.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        result = broadcast_object_list([result])[0]  # also keeps the others waiting until the renames are done
    if result[0] == "error":
        raise result[1]
    return result[1]


# --- One run per output_dir -------------------------------------------------------------------------------------

LOCK_FILE = "_fipo_trl_run.lock"  # "_*": left out of Hub uploads of output_dir
_held_locks: dict[str, list] = {}  # real path of output_dir -> [open lock file, holders in this process]


def acquire_output_dir_lock(output_dir) -> None:
    """Take the run's lock on ``output_dir`` (``<output_dir>/_fipo_trl_run.lock``, an exclusive ``flock``), or
    raise ValueError naming the run that holds it. The kernel drops the lock when its process ends, however it
    ends, so the file a dead run left behind is simply taken over. Re-entrant within a process (the CLI takes it
    before the model loads, ``train`` again): release as often as acquired."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"output_dir {str(output_dir)!r} cannot be created ({error}). Fix: pass a folder you can "
                         "write to as --output_dir.") from None
    key = os.path.realpath(folder)
    if key in _held_locks:
        _held_locks[key][1] += 1
        return
    path = folder / LOCK_FILE
    while True:
        try:
            handle = open(path, "a+")  # noqa: SIM115 - held open for the whole run
        except OSError as error:
            raise ValueError(f"output_dir {str(output_dir)!r}: cannot create the run's lock file {path} ({error}). "
                             "Fix: pass a folder you can write to as --output_dir.") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ValueError(
                f"output_dir {str(output_dir)!r} is in use by another fipo_trl run ({holder}); two runs writing one "
                "output_dir overwrite each other's checkpoints. Fix: wait for that run to end, or pass another "
                f"--output_dir. (The lock is {path}; the system releases it when that run's process ends.)") from None
        except OSError:  # a filesystem without flock (some network mounts): run unlocked rather than not at all
            handle.close()
            warnings.warn(f"output_dir {str(output_dir)!r}: this filesystem does not support file locks, so a second "
                          "run into the same output_dir would not be stopped.", UserWarning, stacklevel=3)
            return
        try:  # the holder may have removed the file between our open and flock: lock the file that is there
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC\n")
    handle.flush()
    _held_locks[key] = [handle, 1]


def release_output_dir_lock(output_dir) -> None:
    key = os.path.realpath(output_dir)
    if key not in _held_locks:
        return
    _held_locks[key][1] -= 1
    if _held_locks[key][1] == 0:
        handle, _ = _held_locks.pop(key)
        Path(output_dir, LOCK_FILE).unlink(missing_ok=True)  # unlinked while still locked: see the samestat check
        handle.close()


@contextmanager
def output_dir_lock(output_dir, take: bool = True):
    """Hold the run's lock on ``output_dir`` for the block (``take`` False: a process that is not the main one)."""
    if take:
        acquire_output_dir_lock(output_dir)
    try:
        yield
    finally:
        if take:
            release_output_dir_lock(output_dir)


def check_fresh_output_dir(output_dir, overwrite: bool = False) -> list[str]:
    """A run that does not resume must not save into an output_dir that holds another run's checkpoints: its
    checkpoint-2 would overwrite theirs, and a later resume would continue the old run from its newer steps. Raise
    ValueError naming the fixes; with ``overwrite``, move the old checkpoints to ``previous-run-<n>/`` (kept)
    and return the message saying so."""
    old = list_checkpoints(output_dir)
    if not old:
        return []
    if not overwrite:
        names = ", ".join(p.name for p in old[-3:]) + (" ..." if len(old) > 3 else "")
        raise ValueError(
            f"output_dir {str(output_dir)!r} already holds checkpoints of a run ({names}), and this run does not "
            "resume: its saves would overwrite them and mix two runs. Fix: pass --resume_from_checkpoint true to "
            "continue that run, or --overwrite_output_dir true to start over (the old checkpoints are moved to "
            "previous-run-<n>/ in it, not deleted), or pass a new --output_dir.")
    n = 1
    while (Path(output_dir) / f"previous-run-{n}").exists():
        n += 1
    target = Path(output_dir) / f"previous-run-{n}"
    target.mkdir()
    for checkpoint in old:
        checkpoint.rename(target / checkpoint.name)
        saving_marker(checkpoint).unlink(missing_ok=True)
    return [f"overwrite_output_dir: moved the {len(old)} checkpoint(s) of the earlier run in {output_dir} to {target} "
            "(kept, out of this run's way). Delete that folder once you no longer need it."]


# --- What a run used, recorded in each checkpoint and compared at resume -------------------------------------------

RUN_SETTINGS_FILE = "fipo_run_settings.json"
# The settings whose change a resumed run is told about (and the card records): the loss, the batch geometry, the
# sampling. A change here does not break the run; what does is in compare_run_settings.
COMPARED_SETTINGS = (
    "fipo_decay_rate", "fipo_clip_ratio", "fipo_clip_high_only", "fipo_safety_threshold", "fipo_sequence_filter",
    "delta", "epsilon", "epsilon_high", "beta", "loss_type", "importance_sampling_level", "num_generations",
    "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation", "num_iterations",
    "learning_rate", "max_completion_length", "temperature", "seed", "dynamic_sampling",
)
# Config entries that fix the shapes of the weights: a checkpoint of another architecture cannot load.
ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "num_attention_heads", "num_key_value_heads", "n_embd", "n_layer", "n_head", "d_model")


def dataset_identity(dataset) -> dict | None:
    """Rows, columns and a hash of the prompts: enough to tell another dataset from the same one reloaded (the
    datasets fingerprint is random for in-memory datasets)."""
    try:
        rows = len(dataset)
        prompts = dataset["prompt"]
    except (TypeError, KeyError):  # streaming, or no prompt column
        return None
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps(prompt, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return {"rows": rows, "columns": list(dataset.column_names), "prompts_sha256": digest.hexdigest()[:16]}


def run_settings(trainer) -> dict:
    """What this run uses (computed once per trainer; the dataset hash reads every prompt)."""
    cached = getattr(trainer, "_fipo_run_settings", None)
    if cached is None:
        settings = {name: getattr(trainer.args, name, None) for name in COMPARED_SETTINGS}
        settings["world_size"] = trainer.accelerator.num_processes
        cached = {"settings": settings, "dataset": dataset_identity(trainer.train_dataset)}
        trainer._fipo_run_settings = cached
    return cached


def read_run_settings(checkpoint) -> dict | None:
    try:
        return json.loads((Path(checkpoint) / RUN_SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return None  # a checkpoint from before fipo_trl recorded them, or of another tool


def check_architecture(checkpoint, model_config, model_name: str = "the model") -> None:
    """Refuse a checkpoint whose weights have other shapes than the model's: transformers would fail with a raw
    size mismatch after loading (or, for some layers, load them partly)."""
    try:
        saved = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return  # an adapter checkpoint, or no config: nothing to compare
    current = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    differ = [f"{key}: {saved[key]!r} in the checkpoint, {current[key]!r} in {model_name}" for key in ARCHITECTURE_KEYS
              if key in saved and key in current and saved[key] != current[key]]
    if differ:
        raise ValueError(
            f"resume_from_checkpoint: {checkpoint} is of another model architecture ({'; '.join(differ)}), so its "
            "weights cannot be loaded into this model. Fix: pass the model the run was trained from as "
            "--model_name_or_path, or start a new run (drop --resume_from_checkpoint, in a new --output_dir).")


def check_dynamic_sampling_seed(checkpoint, args) -> None:
    """With dynamic sampling the refill stream resumes from its saved position, which only means something under
    the seed it was drawn with: refuse another seed before anything loads."""
    if not getattr(args, "dynamic_sampling", False):
        return
    saved = (read_run_settings(checkpoint) or {}).get("settings", {}).get("seed")
    if saved is None:
        try:  # checkpoints from before the settings file: the stream's own state has its seed (the run's seed + 1)
            saved = json.loads((Path(checkpoint) / "dynamic_sampling_state_0.json").read_text())["seed"] - 1
        except (OSError, ValueError, KeyError, TypeError):
            return
    if saved != args.seed:
        raise ValueError(f"resume_from_checkpoint: {checkpoint} was trained with seed {saved} and dynamic sampling, "
                         f"this run has seed {args.seed}: the refill stream cannot continue under another seed. "
                         f"Fix: resume with --seed {saved}.")


def compare_run_settings(saved: dict | None, current: dict) -> list[str]:
    """The changes between a checkpoint's recorded settings and this run's, as 'name: old -> new' lines."""
    if not saved:
        return []
    changes = []
    old, new = saved.get("settings", {}), current["settings"]
    for name in new:
        if name in old and old[name] != new[name]:
            note = ""
            if name == "world_size":
                note = (" processes (the per-process RNG states of the other ranks are not restored, and the global "
                        "batch changes with the number of processes)")
            changes.append(f"{name}: {old[name]!r} -> {new[name]!r}{note}")
    old_data, new_data = saved.get("dataset"), current.get("dataset")
    if old_data and new_data and old_data != new_data:
        changes.append(f"train_dataset: another dataset ({old_data.get('rows')} rows, prompts "
                       f"{old_data.get('prompts_sha256')} -> {new_data.get('rows')} rows, prompts "
                       f"{new_data.get('prompts_sha256')}): the resumed data order does not continue the old one")
    return changes


def check_resume_before_load(checkpoint, args, model_config=None, model_name: str = "the model") -> None:
    """What breaks a resumed run, checked before the model and the checkpoint load: another architecture, another
    seed under dynamic sampling."""
    if checkpoint is None:
        return
    if model_config is not None:
        check_architecture(checkpoint, model_config, model_name)
    check_dynamic_sampling_seed(checkpoint, args)


def check_output_dir_before_load(args, model_name_or_path: str | None = None) -> None:
    """For ``fipo-trl train``, before anything loads: a resume flag must resolve to a complete checkpoint of this
    model's architecture (and seed, under dynamic sampling); a fresh run must not mix its checkpoints with another
    run's (see ``check_fresh_output_dir``; with overwrite_output_dir, train() moves them)."""
    resume = args.resume_from_checkpoint
    if resume in (None, False) or (isinstance(resume, str) and resume.strip().lower() == "false"):
        if not getattr(args, "overwrite_output_dir", False):
            check_fresh_output_dir(args.output_dir)
    else:
        checkpoint, _ = resolve_resume(resume, args.output_dir, not args.save_only_model)
        config = None
        if model_name_or_path is not None:
            from transformers import AutoConfig

            try:
                config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=args.trust_remote_code)
            except Exception:  # noqa: BLE001 - an unreadable model is reported by its load, with its own error
                config = None
        check_resume_before_load(checkpoint, args, config, model_name_or_path or "the model")


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


def write_run_settings(trainer, folder: Path) -> None:
    """Record in the checkpoint what the run used (compared when a run resumes from it) and the settings changes
    of earlier resumes (the model card lists them)."""
    record = {**run_settings(trainer), "resumed": getattr(trainer, "_fipo_resume_history", [])}
    (folder / RUN_SETTINGS_FILE).write_text(json.dumps(record, indent=1, default=str))


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
            write_run_settings(trainer, folder)
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
    about each partial one it skips, and every save is marked in progress until it has finished. One run at a time
    writes output_dir (a lock), a fresh run never mixes its checkpoints with an earlier run's, and a resume is told
    what settings changed. Nothing here is specific to FIPO."""

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        resume_from_checkpoint = prepare_resume(self, resume_from_checkpoint)  # the main process now holds the lock
        try:
            with guard_checkpoint_saves(self):
                return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if self.accelerator.is_main_process:
                release_output_dir_lock(self.args.output_dir)
