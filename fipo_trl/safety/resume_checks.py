"""What a run checks about output_dir before it trains: a resume that would break (another architecture, another
seed under dynamic sampling, another checkpoint layout, another number of DeepSpeed processes) or overwrite newer
work (a checkpoint older than complete ones in output_dir, or past max_steps), and a fresh run onto another run's
checkpoints. Each raises ValueError naming the fix; with ``overwrite_output_dir`` the checkpoints in the way are moved
to ``previous-run-<n>/`` instead (``move_aside``: checked first, never deleted).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fipo_trl.safety.checkpoint_files import (
    checkpoint_problems,
    checkpoint_step,
    is_model_only,
    list_checkpoints,
    saved_world_size,
    saving_marker,
)
from fipo_trl.safety.run_settings import check_architecture, check_dynamic_sampling_seed


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



def check_resume_before_load(checkpoint, args, model_config=None, model_name: str = "the model",
                             use_peft: bool | None = None, world_size: int | None = None) -> None:
    """What breaks a resumed run, checked before the checkpoint loads: another architecture, another seed under
    dynamic sampling, another checkpoint layout (LoRA or whole model, when ``use_peft`` is known), another number of
    DeepSpeed processes (when ``world_size`` is known)."""
    if checkpoint is None:
        return
    if model_config is not None:
        check_architecture(checkpoint, model_config, model_name)
    check_dynamic_sampling_seed(checkpoint, args)
    if use_peft is not None:
        check_checkpoint_layout(checkpoint, use_peft)
    if world_size is not None:
        check_world_size(checkpoint, world_size)


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
