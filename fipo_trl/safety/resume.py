"""Where a run starts: the newest complete checkpoint when it resumes, a clean output_dir when it does not.

``resume_from_checkpoint`` (True, "true", or a path) resolves to the newest *complete* checkpoint
(``checkpoint_files.checkpoint_problems`` is empty), with a warning naming each partial one it skips. Partial folders
newer than that are renamed ``incomplete-checkpoint-<step>`` (kept, never deleted), so the resumed run saves into
fresh folders and checkpoint rotation (save_total_limit) cannot keep a partial folder as "the newest" and delete the
complete ones. A run that does not resume refuses an output_dir holding another run's checkpoints, or with
``overwrite_output_dir`` moves them to ``previous-run-<n>/``. A resume is checked against the checkpoint's recorded
settings (``run_settings.py``) before anything loads.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from fipo_trl.safety.checkpoint_files import (
    MARKER_PREFIX,
    MODEL_ONLY,
    checkpoint_problems,
    checkpoint_step,
    is_model_only,
    list_checkpoints,
    newest_complete_checkpoint,
    saved_world_size,
    saving_marker,
)
from fipo_trl.safety.lock import acquire_output_dir_lock, release_output_dir_lock
from fipo_trl.safety.run_settings import (
    check_architecture,
    check_dynamic_sampling_seed,
    compare_run_settings,
    read_run_settings,
    run_settings,
    run_settings_problem,
)

SET_ASIDE_PREFIX = "incomplete-"  # not "checkpoint-*": invisible to get_last_checkpoint and rotation


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
                model = trainer.accelerator.unwrap_model(trainer.model)
                check_resume_before_load(checkpoint, args, model.config)
                check_checkpoint_layout(checkpoint, use_peft=hasattr(model, "peft_config"))
                check_world_size(checkpoint, trainer.accelerator.num_processes)
                step = checkpoint_global_step(checkpoint)
                messages += check_resume_target(checkpoint, step, args, getattr(args, "overwrite_output_dir", False),
                                                training_state)
                saved = read_run_settings(checkpoint)
                if saved is None:
                    messages.append(
                        f"resume_from_checkpoint: {run_settings_problem(checkpoint)} in {checkpoint}, so the settings "
                        "it was trained with are unknown and changes to them (fipo_* settings, learning_rate, batch "
                        "geometry, ...) cannot be checked. The run continues with the settings given now.")
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



def move_aside(output_dir, checkpoints: list[Path]) -> Path:
    """Move ``checkpoints`` to a new ``previous-run-<n>/`` in output_dir (kept, never deleted); returns it."""
    n = 1
    while (Path(output_dir) / f"previous-run-{n}").exists():
        n += 1
    target = Path(output_dir) / f"previous-run-{n}"
    device = os.stat(output_dir).st_dev
    for checkpoint in checkpoints:  # every move must be possible before the first one is made
        why = ("it lies on another filesystem (a mount)" if os.lstat(checkpoint).st_dev != device
               else "it or output_dir is not writable" if not (os.access(checkpoint, os.W_OK)
                                                                and os.access(output_dir, os.W_OK)) else None)
        if why:
            raise ValueError(f"overwrite_output_dir: the earlier run's {checkpoint} cannot be moved to {target} "
                             f"({why}); nothing was moved. Fix: make it movable, or move it yourself, or pass a new "
                             "--output_dir.")
    target.mkdir()
    moved = []
    for checkpoint in checkpoints:
        try:
            checkpoint.rename(target / checkpoint.name)
        except OSError as error:
            left = [c.name for c in checkpoints if c not in moved]
            raise ValueError(
                f"overwrite_output_dir: moving {checkpoint} to {target} failed ({error}). Nothing was deleted: "
                f"{[c.name for c in moved]} are now in {target}, {left} are still in {output_dir}. Fix: make "
                "them movable, then rerun (the moved ones stay where they are), or pass a new --output_dir."
            ) from None
        moved.append(checkpoint)
        saving_marker(checkpoint).unlink(missing_ok=True)
    return target


def checkpoint_global_step(checkpoint) -> int:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]


def check_resume_target(checkpoint, step: int, args, overwrite: bool = False,
                        training_state: bool = True) -> list[str]:
    """What a resume from ``checkpoint`` (at ``step``) would do to output_dir, checked before it trains. Its saves
    (checkpoint-<step + k>) would overwrite the newer complete checkpoints there, of this run (branching from an older
    step) or of another (an older run's checkpoint resumed into a newer run's output_dir): refused with the fixes,
    or with ``overwrite`` moved to ``previous-run-<n>/`` and said. A max_steps below the step leaves nothing to
    train and would only rewrite the final model: refused."""
    if isinstance(args.max_steps, int) and 0 < args.max_steps < step:
        raise ValueError(
            f"resume_from_checkpoint: {checkpoint} is at step {step}, past max_steps = {args.max_steps}: there is "
            "nothing left to train, and the run would only rewrite the final model and the model card. Fix: raise "
            f"--max_steps above {step} to train further, or drop --resume_from_checkpoint.")
    resumed = Path(checkpoint).resolve()
    newer = []
    for folder in list_checkpoints(args.output_dir):
        if checkpoint_step(folder) <= step or folder.resolve() == resumed:
            continue
        problems = checkpoint_problems(folder, training_state)
        if not problems or is_model_only(problems):  # partial ones are set aside (set_aside_incomplete)
            newer.append(folder)
    if not newer:
        return []
    names = ", ".join(p.name for p in newer)
    if not overwrite:
        raise ValueError(
            f"resume_from_checkpoint: {checkpoint} is at step {step}, but output_dir {str(args.output_dir)!r} holds "
            f"newer complete checkpoints ({names}); the resumed run's saves would overwrite them. Fix: resume from "
            "the newest with --resume_from_checkpoint true, or branch from this one with --overwrite_output_dir true "
            "(the newer checkpoints are moved to previous-run-<n>/ in output_dir, not deleted), or pass a new "
            "--output_dir.")
    target = move_aside(args.output_dir, newer)
    return [f"overwrite_output_dir: resuming from step {step}, moved the newer checkpoint(s) {names} to {target} "
            "(kept, out of this run's way). Delete that folder once you no longer need it."]


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
    target = move_aside(output_dir, old)
    return [f"overwrite_output_dir: moved the {len(old)} checkpoint(s) of the earlier run in {output_dir} to {target} "
            "(kept, out of this run's way). Delete that folder once you no longer need it."]



def check_resume_before_load(checkpoint, args, model_config=None, model_name: str = "the model") -> None:
    """What breaks a resumed run, checked before the model and the checkpoint load: another architecture, another
    seed under dynamic sampling."""
    if checkpoint is None:
        return
    if model_config is not None:
        check_architecture(checkpoint, model_config, model_name)
    check_dynamic_sampling_seed(checkpoint, args)


def check_world_size(checkpoint, world_size: int) -> None:
    """A DeepSpeed ZeRO checkpoint holds one optimizer partition per process, and DeepSpeed loads it only on as many
    processes. (FSDP's checkpoints reshard on load and DDP's hold the whole state: those resume on any number, with
    the warning of run_settings.py.)"""
    folder = Path(checkpoint)
    if not ((folder / "latest").is_file() or any(folder.glob("global_step*"))):
        return
    saved = saved_world_size(folder)
    if saved and saved != world_size:
        raise ValueError(
            f"resume_from_checkpoint: {checkpoint} is a DeepSpeed ZeRO checkpoint saved by {saved} processes, and "
            f"this run has {world_size}: DeepSpeed loads its optimizer partitions only on as many processes. Fix: "
            f"resume on {saved} processes (accelerate launch --num_processes {saved}), or start a new run from its "
            "weights (its model.safetensors, or zero_to_fp32.py in it) with --model_name_or_path.")


def check_checkpoint_layout(checkpoint, use_peft: bool) -> None:
    """A LoRA checkpoint holds only the adapter, a full one only the model: resumed into the other kind of model,
    transformers fails after the model loads ("Can't find a checkpoint index"). Name the flag instead."""
    folder = Path(checkpoint)
    adapter_names = ("adapter_model.safetensors", "adapter_model.bin")
    adapter = any((folder / name).is_file() for name in adapter_names) or any(
        entry.is_dir() and any((entry / name).is_file() for name in adapter_names) for entry in folder.iterdir())
    full = any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json",
                                                        "pytorch_model.bin", "pytorch_model.bin.index.json"))
    if adapter and not full and not use_peft:
        raise ValueError(f"resume_from_checkpoint: {checkpoint} holds a LoRA adapter, not the whole model: it was "
                         "trained with --use_peft. Fix: add --use_peft (with that run's --lora_* flags) to resume it.")
    if full and not adapter and use_peft:
        raise ValueError(f"resume_from_checkpoint: {checkpoint} holds the whole model, not a LoRA adapter: it was "
                         "trained without --use_peft. Fix: drop --use_peft to resume it.")


def check_output_dir_before_load(args, model_name_or_path: str | None = None, use_peft: bool | None = None) -> None:
    """For ``fipo-trl train``, before anything loads: a resume flag must resolve to a complete checkpoint of this
    model's architecture (and seed, under dynamic sampling); a fresh run must not mix its checkpoints with another
    run's (see ``check_fresh_output_dir``; with overwrite_output_dir, train() moves them)."""
    resume = args.resume_from_checkpoint
    if resume in (None, False) or (isinstance(resume, str) and resume.strip().lower() == "false"):
        if not getattr(args, "overwrite_output_dir", False):
            check_fresh_output_dir(args.output_dir)
    else:
        checkpoint, _ = resolve_resume(resume, args.output_dir, not args.save_only_model)
        if not getattr(args, "overwrite_output_dir", False):  # with it, train() moves the newer checkpoints
            check_resume_target(checkpoint, checkpoint_global_step(checkpoint), args, False, not args.save_only_model)
        if use_peft is not None:
            check_checkpoint_layout(checkpoint, use_peft)
        check_world_size(checkpoint, args.world_size)
        config = None
        if model_name_or_path is not None:
            from transformers import AutoConfig

            try:
                config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=args.trust_remote_code)
            except Exception:  # noqa: BLE001 - an unreadable model is reported by its load, with its own error
                config = None
        check_resume_before_load(checkpoint, args, config, model_name_or_path or "the model")

