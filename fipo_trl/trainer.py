"""FIPOTrainer: TRL's GRPOTrainer with FIPO's Future-KL weights on the per-token advantages.

The hook is two methods wide. ``_compute_loss`` hands TRL a private copy of the micro-batch; the first forward pass
TRL runs inside it (``_get_per_token_logps_and_entropies``) yields log pi_theta, from which ``fipo_weights`` computes
the detached weights f, and the copy's advantages become the (B, T) tensor A * f before TRL reads them. Everything
else (loss types, PPO and dual clipping via ``delta``, vLLM IS correction, KL, entropy terms, metrics) is TRL's own.
If TRL ever reads the advantages before that forward pass, or skips it, training stops with an error instead of
silently running TRL's loss without the weights (with FIPOConfig's official settings: DAPO).
"""

from __future__ import annotations

import math
import os
import textwrap
import warnings

import torch
from transformers.utils import logging
from trl import GRPOConfig, GRPOTrainer

from fipo_trl.config import FIPOConfig
from fipo_trl.dynamic_sampling import DynamicSamplingMixin
from fipo_trl.inert_watch import InertFIPOWatch, inert_message
from fipo_trl.kernels.common import LOG_RATIO_CLAMP
from fipo_trl.loss import fipo_weights, hyperparameters_from_config, metrics_from_stats, stats_over_ranks
from fipo_trl.safety.before_load import check_after_trl_init, check_before_load
from fipo_trl.safety.hub import HubResilienceMixin
from fipo_trl.safety.numerics import non_finite_loss_error
from fipo_trl.safety.rewards import CheckedRewardsMixin
from fipo_trl.safety.saving import SafeCheckpointsMixin
from fipo_trl.safety.versions import supported_range
from fipo_trl.tools.model_card import render_model_card

logger = logging.get_logger(__name__)

_HOOK_BROKEN = (
    "FIPOTrainer's loss hook {what}. FIPOTrainer relies on GRPOTrainer._compute_loss running the policy forward "
    "pass (_get_per_token_logps_and_entropies) before it reads inputs['advantages']; this TRL version does not, "
    "so FIPO weights cannot be applied. Install a TRL version fipo_trl supports ({trl_range})."
)


def _hook_broken(what: str) -> RuntimeError:
    return RuntimeError(_HOOK_BROKEN.format(what=what, trl_range=supported_range("trl")))


class _MicroBatch(dict):
    """FIPOTrainer's private copy of one micro-batch. TRL buffers and reuses its own dict across iterations, so it
    is never modified; this copy also refuses to hand out the advantages before the FIPO weights are in them."""

    weighted = False

    def _guard(self, key):
        if key == "advantages" and not self.weighted:
            raise _hook_broken("saw the advantages read before the forward pass")

    def __getitem__(self, key):
        self._guard(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._guard(key)
        return super().get(key, default)


def _bound_log_ratios(batch: _MicroBatch, logps: torch.Tensor) -> torch.Tensor:
    """Give TRL's loss the official +-20 clamp of the log-ratio; returns the log-probs TRL should use.

    TRL exponentiates log pi - log pi_old (and, with beta > 0, log pi_ref - log pi for the k3 KL) unclamped: one
    token past ~88.7 overflows float32, even off the response, and the backward puts 0 * inf = NaN into every
    gradient. Where a difference is within +-20 nothing changes, bit for bit. Beyond, the private copy's pi_old
    (pi_ref) is replaced by log pi -+ clamp(difference): TRL's difference is then the clamped value and carries
    no gradient, as in the official loss (and verl's low_var_kl clamp for the KL). Off the response the difference
    becomes 0. Non-finite log-probs become constants (the official clamp gives them zero gradient too)."""
    mask = dict.__getitem__(batch, "completion_mask").bool()
    logps = torch.where(torch.isfinite(logps), logps, torch.zeros((), dtype=logps.dtype, device=logps.device))
    policy = logps.detach().float()
    for key, sign in (("old_per_token_logps", 1.0), ("ref_per_token_logps", -1.0)):
        other = dict.get(batch, key)
        if other is None:
            continue
        difference = sign * (policy - other.float())  # what TRL exponentiates
        bounded = torch.where(mask, difference.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), 0.0).nan_to_num(0.0)
        outside = ~(difference.abs() <= LOG_RATIO_CLAMP)  # NaN counts as outside
        dict.__setitem__(batch, key, torch.where(outside, logps - sign * bounded, other))
    return logps


# docstyle-ignore
_CITATION = textwrap.dedent("""\
    @article{fipo2026,
        title        = {{FIPO: Eliciting Deep Reasoning with Future-KL Influenced Policy Optimization}},
        author       = {{Qwen Pilot Team}},
        year         = 2026,
        eprint       = {arXiv:2603.19835},
    }""")


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)
    logger.warning(message)


class FIPOTrainer(SafeCheckpointsMixin, HubResilienceMixin, CheckedRewardsMixin, DynamicSamplingMixin, GRPOTrainer):
    """[`~trl.GRPOTrainer`] for FIPO ([arXiv 2603.19835](https://huggingface.co/papers/2603.19835)): each completion
    token's advantage is multiplied by a detached Future-KL influence weight f before TRL's loss reads it; the rest
    (loss types, clipping, KL, vLLM, metrics) is TRL's. Same arguments as GRPOTrainer, with a [`FIPOConfig`] as
    `args` (default: the official 32B recipe). docs/trainer.md lists every difference: the bnpo token mean of kept
    tokens, the +-20 log-ratio clamp, the `fipo/*` metrics, and the run-safety layer (fipo_trl/safety/).

    >>> FIPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=accuracy_reward, train_dataset=data).train()
    """

    _tag_names = ["trl", "grpo", "fipo"]
    _name = "FIPO"
    _paper = {"title": "FIPO: Eliciting Deep Reasoning with Future-KL Influenced Policy Optimization",
              "id": "2603.19835", "citation": _CITATION}

    def __init__(self, model, reward_funcs=None, args: FIPOConfig | None = None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = FIPOConfig(f"{name.split('/')[-1]}-FIPO")
        elif not isinstance(args, FIPOConfig):
            kind = "GRPOConfig" if isinstance(args, GRPOConfig) else type(args).__name__
            raise TypeError(f"FIPOTrainer needs `args` to be a FIPOConfig, got a {kind}. Replace GRPOConfig(...) with "
                            "fipo_trl.FIPOConfig(...): it takes the same arguments plus the FIPO fields.")
        check_before_load(model, reward_funcs, args, pargs, kwargs)
        for message in args.fipo_schedule_warnings:  # FIPO degenerate (DAPO), or steps straddling batches
            _warn(message)
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        check_after_trl_init(model, args)
        self._fipo_loss_hooked = False  # set by _compute_loss, checked by compute_loss: TRL still calls the hook
        self._fipo_pending: tuple | None = None  # (model, micro-batch) between _compute_loss and its forward pass
        self.fipo_last_batch: dict[str, torch.Tensor] | None = None  # the last weighted micro-batch, for callbacks
        self.fipo_backend: str | None = None  # which path computes the weights: "triton", "c" or "torch"
        self._fipo_inert_watch = InertFIPOWatch.for_config(self.args)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, eval_results: dict | None = None):
        """Write the FIPO model card (tools/model_card.py; eval_results: ``{dataset: {metric: value}}``) to
        ``output_dir/README.md``, on every checkpoint save and by ``push_to_hub``."""
        if not self.is_world_process_zero():
            return
        card = render_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags,
                                 eval_results=eval_results)
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._fipo_loss_hooked = False
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
        if not self._fipo_loss_hooked:  # e.g. a TRL version whose Liger loss path skips _compute_loss
            raise _hook_broken("was bypassed: GRPOTrainer.compute_loss did not call _compute_loss (is "
                               "use_liger_kernel's fused loss on?)")
        return loss

    def _compute_loss(self, model, inputs):
        self._fipo_loss_hooked = True
        batch = _MicroBatch(inputs)
        self._fipo_pending = (model, batch)
        try:
            loss = super()._compute_loss(model, batch)
        finally:
            self._fipo_pending = None
        if not batch.weighted:
            raise _hook_broken("never ran: no policy forward pass happened in _compute_loss")
        if not torch.isfinite(loss):  # before backward: a NaN/inf step would poison every weight
            raise non_finite_loss_error(loss, dict.__getitem__(batch, "advantages"), self.args.delta)
        return loss

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        outputs = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        if self._fipo_pending is not None and self._fipo_pending[0] is model:
            batch = self._fipo_pending[1]
            self._fipo_pending = None  # only the policy forward of this micro-batch
            self._apply_fipo_weights(batch, outputs[0])
            outputs = (_bound_log_ratios(batch, outputs[0]), *outputs[1:])
        return outputs

    @torch.no_grad()
    def _apply_fipo_weights(self, batch: _MicroBatch, per_token_logps: torch.Tensor) -> None:
        args = self.args
        logps = per_token_logps.detach().float()
        old = dict.get(batch, "old_per_token_logps")
        # TRL drops old log-probs when pi_old == pi_theta (one update per generation batch): then F = 0, f = 1.
        old = logps if old is None else old.float()
        mask = dict.__getitem__(batch, "completion_mask").bool()
        if "tool_mask" in batch:
            mask = mask & dict.__getitem__(batch, "tool_mask").bool()
        advantages = dict.__getitem__(batch, "advantages")
        out = fipo_weights(logps, old, advantages.float(), mask, **hyperparameters_from_config(args))
        weighted = out.weighted_advantages  # A * f (0 off the response), written by the kernel in its one pass
        if args.fipo_sequence_filter:
            row_scale = out.keep.to(weighted.dtype)
            if args.loss_type == "bnpo":  # drop the filtered completions from the token-mean denominator as well
                kept_tokens = (mask & out.keep[:, None]).sum()
                row_scale = row_scale * (mask.sum() / kept_tokens.clamp(min=1))
            weighted = weighted * row_scale[:, None]
        batch["advantages"] = weighted.to(advantages.dtype)
        batch.weighted = True
        self._log_fipo_metrics(out.stats, fused=out.backend in ("triton", "c"))
        if self.fipo_backend != out.backend:
            self.fipo_backend = out.backend
            logger.info(f"FIPO weights are computed by the {out.backend} path on {logps.device}.")
        self.fipo_last_batch = {
            "prompt_ids": dict.__getitem__(batch, "prompt_ids"), "prompt_mask": dict.__getitem__(batch, "prompt_mask"),
            "completion_ids": dict.__getitem__(batch, "completion_ids").detach(), "mask": mask,
            "advantages": advantages.detach(), "weights": out.weights, "future_kl": out.future_kl, "keep": out.keep,
        }

    def _log_fipo_metrics(self, stats: dict[str, torch.Tensor], fused: bool) -> None:
        """Reduce the stats over all ranks (one gather, run unconditionally on every rank) and log the metrics."""
        stats = stats_over_ranks(stats, self.accelerator)
        mode = "train" if self.model.training else "eval"
        figures = self._fipo_inert_watch.add(stats) if mode == "train" and self._fipo_inert_watch else None
        if figures is not None and self.is_world_process_zero():
            _warn(inert_message(figures, self.args))
        for name, value in metrics_from_stats(stats).items():
            if not math.isnan(value):  # an extremum of an empty set: left out of this step, not logged as None
                self._metrics[mode][f"fipo/{name}"].append(value)
        self._metrics[mode]["fipo/fused_kernel"].append(float(fused))  # 1: a fused kernel (Triton or C), 0: torch
        self._metrics[mode]["fipo/vllm_generation"].append(float(self.use_vllm))  # 1: vLLM sampled, 0: transformers
