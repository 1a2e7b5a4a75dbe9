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
    saving_marker,
)
from fipo_trl.safety.lock import acquire_output_dir_lock, release_output_dir_lock
from fipo_trl.safety.resume_checks import (
    check_fresh_output_dir,
    check_resume_before_load,
    check_resume_target,
    checkpoint_global_step,
)
from fipo_trl.safety.run_settings import (
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
                check_resume_before_load(checkpoint, args, model.config, use_peft=hasattr(model, "peft_config"),
                                         world_size=trainer.accelerator.num_processes)
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
        config = None
        if model_name_or_path is not None:
            from transformers import AutoConfig

            try:
                config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=args.trust_remote_code)
            except Exception:  # noqa: BLE001 - an unreadable model is reported by its load, with its own error
                config = None
        check_resume_before_load(checkpoint, args, config, model_name_or_path or "the model", use_peft,
                                 args.world_size)

