"""Hub pushes that never stop a run: a Trainer mixin, and the warning any caller can raise.

transformers pushes checkpoints in background futures whose errors nobody reads, and a failed repository creation or
final push raises out of ``train()`` / ``push_to_hub()``. With :class:`HubResilienceMixin`, every failure is reported
with a warning that names the repository and where the files are, and the run goes on with its model and checkpoints
safe in ``output_dir``. Any exception is caught on purpose: the push path must never kill a run. Nothing here is
specific to FIPO; it works on any ``transformers.Trainer``.
"""

from __future__ import annotations

import os
import warnings

from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["HubResilienceMixin", "warn_hub_failure"]


def warn_hub_failure(trainer, action: str, error: BaseException, repo_id: str | None = None) -> None:
    """Warn (and log) that ``action`` failed for ``repo_id`` (default: the trainer's Hub repository), saying that
    nothing is lost and how to push later."""
    repo_id = getattr(trainer, "hub_model_id", None) if repo_id is None else repo_id
    message = (f"{type(trainer).__name__} could not {action} to {repo_id!r}: {type(error).__name__}: {error}. "
               f"Training continues and nothing is lost: the model and checkpoints are in "
               f"{os.path.abspath(trainer.args.output_dir)}. Push them later with trainer.push_to_hub() or "
               "`hf upload`.")
    warnings.warn(message, UserWarning, stacklevel=3)
    logger.warning(message)


class HubResilienceMixin:
    """Mix in before ``transformers.Trainer`` (``class MyTrainer(HubResilienceMixin, GRPOTrainer)``): Hub outages
    are warnings, not crashes, and a repository that could not be created is retried at the next checkpoint push."""

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        try:
            super().init_hf_repo(token=token, private=private)
            self._hub_repo_ready = True
        except Exception as error:  # noqa: BLE001
            self._hub_repo_ready = False
            self.hub_model_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
            self.push_in_progress = None
            warn_hub_failure(self, "create the Hub repository", error)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if not getattr(self, "_hub_repo_ready", True):
            self.init_hf_repo()  # the Hub may be back
            if not self._hub_repo_ready:
                return
        try:
            super()._push_from_checkpoint(checkpoint_folder)
        except Exception as error:  # noqa: BLE001
            warn_hub_failure(self, f"push {checkpoint_folder}", error)
            return
        in_progress = getattr(self, "push_in_progress", None)  # never set on the processes that do not push
        for job in in_progress.jobs if in_progress is not None else ():
            if not getattr(job, "_fipo_watched", False):  # a background upload: report its failure when it ends
                job._fipo_watched = True
                job.add_done_callback(self._report_failed_push)

    def push_to_hub(self, *args, **kwargs):
        try:
            return super().push_to_hub(*args, **kwargs)
        except Exception as error:  # noqa: BLE001
            warn_hub_failure(self, "push the model", error)
            return None

    def _report_failed_push(self, job) -> None:
        if not job.cancelled() and job.exception() is not None:
            warn_hub_failure(self, "push a checkpoint", job.exception())
