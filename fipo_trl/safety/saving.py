"""Saves that survive a kill or a full disk, and the Trainer mixin that makes ``train`` safe.

Every save first drops a marker file ``_saving_checkpoint-<step>`` next to the folder and removes it only once the
whole save has finished and its files are flushed to disk: a folder whose marker is still there is partial, whatever
files it holds (``checkpoint_files.py``). ``SafeCheckpointsMixin.train`` resolves the resume (``resume.py``, which
takes the output_dir lock) and guards every save of the run.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from fipo_trl.safety.checkpoint_files import newest_complete_checkpoint, saving_marker
from fipo_trl.safety.lock import release_output_dir_lock
from fipo_trl.safety.resume import prepare_resume
from fipo_trl.safety.resume_checks import checkpoint_global_step
from fipo_trl.safety.run_settings import write_run_settings

_INTERNAL_GONE = (
    "fipo_trl's checkpoint guard relies on transformers' Trainer.{name}, which {problem}. Install the transformers "
    "version fipo_trl supports (see pyproject.toml), or report this at fipo_trl."
)



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


def check_steps_trained(trainer, start: int) -> None:
    """A run that was to train and made no optimizer step is an error, not a success (exit status 0, a model card
    for an untrained model): a streamed dataset (its size unknown until it runs out) shorter than one generation
    batch ends training that way."""
    max_steps = trainer.args.max_steps
    if trainer.state.global_step > start or (isinstance(max_steps, int) and 0 < max_steps <= start):
        return
    streamed = not hasattr(trainer.train_dataset, "__len__")
    cause = ("the streamed train_dataset ran out before one generation batch of prompts "
             f"(generation_batch_size / num_generations = "
             f"{trainer.args.generation_batch_size // trainer.args.num_generations})" if streamed
             else "the train_dataset yielded no full generation batch")
    raise RuntimeError(f"training ran 0 optimizer steps (from step {start}): {cause}. Nothing was trained, so no "
                       "model is saved. Fix: add rows, or lower per_device_train_batch_size or "
                       "fipo_updates_per_generation (steps_per_generation).")


class SafeCheckpointsMixin:
    """Mix in before ``transformers.Trainer`` (FIPOTrainer does): ``train`` becomes safe against checkpoints cut
    short by a kill or a full disk. Resuming (True, "true" or a path) uses the newest *complete* checkpoint and warns
    about each partial one it skips, and every save is marked in progress until it has finished. One run at a time
    writes output_dir (a lock), a fresh run never mixes its checkpoints with an earlier run's, a resume is told
    what settings changed, and the final model is saved whole under every FSDP setting. Nothing here is specific to
    FIPO."""

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        resume_from_checkpoint = prepare_resume(self, resume_from_checkpoint)  # the main process now holds the lock
        start = 0 if resume_from_checkpoint is None else checkpoint_global_step(resume_from_checkpoint)
        try:
            with guard_checkpoint_saves(self):
                output = super().train(resume_from_checkpoint, *args, **kwargs)
            check_steps_trained(self, start)
            return output
        finally:
            if self.accelerator.is_main_process:
                release_output_dir_lock(self.args.output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """transformers saves no model for FSDP's SHARDED_STATE_DICT (only checkpoints get its shards): the final
        model would be lost in silence. It is gathered from the shards and saved whole, as with FULL_STATE_DICT."""
        super().save_model(output_dir, _internal_call)
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if _internal_call or not self.is_fsdp_enabled or "FULL_STATE_DICT" in str(plugin.state_dict_type):
            return
        state_dict = self.accelerator.get_state_dict(self.model)  # a collective: every rank takes part
        self._save(output_dir, state_dict=state_dict)
