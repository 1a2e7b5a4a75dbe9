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

from fipo_trl.checkpoints import SafeCheckpointsMixin
from fipo_trl.config import FIPOConfig, check_liger_machine, check_trl_compatibility, check_vllm_machine
from fipo_trl.data import check_training_data
from fipo_trl.dynamic_sampling import DynamicSamplingMixin
from fipo_trl.hub import HubResilienceMixin
from fipo_trl.input_checks import checking_inputs
from fipo_trl.kernels.common import LOG_RATIO_CLAMP, STAT_NAMES, reduce_row_stats
from fipo_trl.kernels.env import check_environment
from fipo_trl.loss import fipo_weights, hyperparameters_from_config, metrics_from_stats, stack_stats
from fipo_trl.model_card import render_model_card
from fipo_trl.reward_checks import CheckedReward, checked_reward
from fipo_trl.versions import supported_range

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


def _check_train_dataset(dataset, args: FIPOConfig) -> None:
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


def _non_finite_loss_message(loss: torch.Tensor, advantages: torch.Tensor, delta: float) -> str:
    largest = advantages.detach().abs().max().item() if advantages.numel() else 0.0
    # TRL sums per-token losses of at most delta x 1.2 x |A| each in float32: could that sum overflow?
    if not math.isfinite(largest) or largest * delta * 1.2 * advantages.numel() >= torch.finfo(torch.float32).max:
        cause = (f"the advantages are too large (largest |advantage| = {largest:.3g}): the PPO surrogate overflows "
                 "float32. Fix: scale the rewards down, or keep scale_rewards='group' (TRL's default), which "
                 "normalises the advantages")
    else:
        cause = ("the policy's log-probabilities or a reward are not finite (largest |advantage| = "
                 f"{largest:.3g}). Fix: check the model's forward pass (NaN weights, a bf16/fp16 overflow) and the "
                 "reward functions")
    return (f"FIPOTrainer: the loss of this micro-batch is {loss.item()}; nothing was applied to the model, whose "
            f"checkpoints are intact. Cause: {cause}.")


class _InertFIPOWatch:
    """Pools the weight stats over a window of generation batches and says when FIPO acts as DAPO: f so close to 1
    on almost every token that the weight no longer changes the update (FIPOConfig.fipo_inert_threshold)."""

    QUIET_WINDOWS = 10  # after a warning, the next this-many windows stay silent

    def __init__(self, threshold: float, micro_batches_per_window: int):
        self.threshold, self.window = threshold, micro_batches_per_window
        self.sums = dict.fromkeys(("n_weight_changed", "n_tokens", "sum_weight", "n_upper_clipped"), 0.0)
        self.seen = self.quiet = 0

    def add(self, stats: dict[str, float]) -> dict[str, float] | None:
        """Add one micro-batch's stats; return the window's figures when it closes inert and a warning is due."""
        for key in self.sums:
            self.sums[key] += stats[key]
        self.seen += 1
        if self.seen < self.window:
            return None
        tokens = self.sums["n_tokens"]
        figures = {"changed": self.sums["n_weight_changed"] / max(tokens, 1.0),
                   "mean": self.sums["sum_weight"] / max(tokens, 1.0),
                   "at_cap": self.sums["n_upper_clipped"] / max(tokens, 1.0)}
        self.sums = dict.fromkeys(self.sums, 0.0)
        self.seen = 0
        if self.quiet:
            self.quiet -= 1
            return None
        if tokens and figures["changed"] < self.threshold:
            self.quiet = self.QUIET_WINDOWS
            return figures
        return None


class FIPOTrainer(SafeCheckpointsMixin, HubResilienceMixin, DynamicSamplingMixin, GRPOTrainer):
    """
    Trainer for Future-KL Influenced Policy Optimization (FIPO), proposed in the paper [FIPO: Eliciting Deep Reasoning
    with Future-KL Influenced Policy Optimization](https://huggingface.co/papers/2603.19835). It is
    [`~trl.GRPOTrainer`] in which each completion token's advantage is multiplied by a detached influence weight f
    before TRL's loss reads it; everything else (loss types, clipping, KL, vLLM, metrics) is TRL's.

    Example:

    ```python
    >>> from fipo_trl import FIPOTrainer
    >>> from trl.rewards import accuracy_reward
    >>> from datasets import load_dataset

    >>> dataset = load_dataset("trl-lib/DeepMath-103K", split="train")

    >>> trainer = FIPOTrainer(
    ...     model="Qwen/Qwen2.5-0.5B-Instruct",
    ...     reward_funcs=accuracy_reward,
    ...     train_dataset=dataset,
    ... )
    >>> trainer.train()
    ```

    Args:
        model, reward_funcs, train_dataset, eval_dataset, processing_class, reward_processing_classes, callbacks,
        optimizers, peft_config, ...:
            As for [`~trl.GRPOTrainer`], which receives them unchanged. `train_dataset` is checked before the model
            loads: it needs a `"prompt"` column and, unless it is streamed, at least one generation batch of prompts
            (`generation_batch_size / num_generations`).
        args ([`FIPOConfig`], *optional*):
            Configuration for this trainer; a [`~trl.GRPOConfig`] is refused with the fix (use `FIPOConfig`, which
            takes the same arguments). If `None`, a default `FIPOConfig` (the official 32B recipe) is used. A config
            that gives one optimizer update per generation batch, where every weight is 1 and FIPO is DAPO, is
            warned about at init.

    Differences from [`~trl.GRPOTrainer`], all documented in docs/trainer.md:

    - the loss: with `loss_type="bnpo"` (FIPOConfig's default) each micro-batch contributes the token mean of its
      kept tokens divided by the gradient-accumulation steps, the official rule; a completion dropped by the sequence
      filter leaves the numerator and, for `"bnpo"`, the denominator (the kept completions' advantages are scaled by
      response tokens / kept tokens, exact because the PPO-clip loss is positively homogeneous in the advantage);
    - the log-ratio TRL exponentiates is clamped to +-20, as in the official loss, and a non-finite loss stops
      training before the optimizer step;
    - the `fipo/*` metrics, `trainer.fipo_backend` (the compute path: `"c"`, `"torch"` or `"triton"`) and
      `trainer.fipo_last_batch` (for callbacks);
    - dynamic sampling, checkpoints that survive a crash mid-save, Hub outages as warnings, and the FIPO model card.
    """

    _tag_names = ["trl", "grpo", "fipo"]
    _name = "FIPO"
    _paper = {
        "title": "FIPO: Eliciting Deep Reasoning with Future-KL Influenced Policy Optimization",
        "id": "2603.19835",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{fipo2026,
                title        = {{FIPO: Eliciting Deep Reasoning with Future-KL Influenced Policy Optimization}},
                author       = {{Qwen Pilot Team}},
                year         = 2026,
                eprint       = {arXiv:2603.19835},
            }"""),
    }

    def __init__(self, model, reward_funcs=None, args: FIPOConfig | None = None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = FIPOConfig(f"{name.split('/')[-1]}-FIPO")
        elif not isinstance(args, FIPOConfig):
            kind = "GRPOConfig" if isinstance(args, GRPOConfig) else type(args).__name__
            raise TypeError(f"FIPOTrainer needs `args` to be a FIPOConfig, got a {kind}. Replace GRPOConfig(...) with "
                            "fipo_trl.FIPOConfig(...): it takes the same arguments plus the FIPO fields.")
        with checking_inputs():  # before the model loads: `fipo-trl` shows these errors as one line
            check_trl_compatibility(args)
            check_environment()  # a bad FIPO_TRL_* value fails here, not at the first loss
            train_dataset = kwargs["train_dataset"] if "train_dataset" in kwargs else (pargs[0] if pargs else None)
            _check_train_dataset(train_dataset, args)
            check_training_data(train_dataset, args, model, reward_funcs,
                                kwargs.get("processing_class", pargs[2] if len(pargs) > 2 else None))
            check_vllm_machine(args)
            if isinstance(model, str):  # before the load; a model already loaded waits for TRL's own checks below
                check_liger_machine(args)
        if args.fipo_is_degenerate:
            message = (
                f"FIPO is degenerate with this config and will train exactly like DAPO: steps_per_generation "
                f"({args.steps_per_generation}) x num_iterations ({args.num_iterations}) divides "
                f"gradient_accumulation_steps ({args.gradient_accumulation_steps}), so each generation batch gets "
                "one optimizer update, log pi_theta == log pi_old at every update and every FIPO weight is 1. Fix: "
                "leave steps_per_generation and generation_batch_size unset (FIPOConfig then makes "
                "fipo_updates_per_generation = 8 updates per generation batch, the official recipe), or set "
                "steps_per_generation = k x gradient_accumulation_steps with k > 1."
            )
            warnings.warn(message, UserWarning, stacklevel=2)
            logger.warning(message)
        if args.fipo_straddles_generation_batches:
            message = (
                f"Optimizer steps straddle generation batches: steps_per_generation ({args.steps_per_generation}) x "
                f"num_iterations ({args.num_iterations}) is not a multiple of gradient_accumulation_steps "
                f"({args.gradient_accumulation_steps}), so each generation batch gets "
                f"{args.fipo_updates_per_generation_batch:.3g} optimizer updates and some updates mix micro-batches "
                "of two generation batches. FIPO's weights stay exact (each micro-batch uses its own pi_old); only "
                "the updates per generation batch are fractional. For a whole number, set steps_per_generation to a "
                "multiple of gradient_accumulation_steps, or leave it unset (fipo_updates_per_generation)."
            )
            warnings.warn(message, UserWarning, stacklevel=2)
            logger.warning(message)
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        if not isinstance(model, str):  # TRL's argument errors first, as with GRPOTrainer; still before any step
            with checking_inputs():
                check_liger_machine(args)
        # Callable reward functions run checked and under the time limit (reward_checks.py); reward models are TRL's.
        self.reward_funcs = [func if isinstance(func, torch.nn.Module)
                             else checked_reward(func, name, self.args.reward_func_timeout_seconds)
                             for func, name in zip(self.reward_funcs, self.reward_func_names, strict=True)]
        self._fipo_loss_hooked = False  # set by _compute_loss, checked by compute_loss: TRL still calls the hook
        self._fipo_pending: tuple | None = None  # (model, micro-batch) between _compute_loss and its forward pass
        self.fipo_last_batch: dict[str, torch.Tensor] | None = None  # the last weighted micro-batch, for callbacks
        self.fipo_backend: str | None = None  # which path computes the weights: "triton", "c" or "torch"
        # micro-batches of one generation batch: each is used steps_per_generation x num_iterations times
        per_batch = self.args.steps_per_generation * self.args.num_iterations
        self._fipo_inert_watch = (_InertFIPOWatch(self.args.fipo_inert_threshold,
                                                  self.args.fipo_inert_window * per_batch)
                                  if self.args.fipo_inert_threshold > 0 else None)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None,
                          eval_results: dict[str, dict[str, float]] | None = None):
        """Write the FIPO model card (``model_cards/fipo_model_card.md``) to ``output_dir/README.md``: base model,
        dataset, FIPO hyperparameters, training curves, evaluation results (``{dataset: {metric: value}}``, also as
        model-index), library versions, citations and how to load the model or adapter. Called on every checkpoint
        save and by ``push_to_hub``."""
        if not self.is_world_process_zero():
            return
        card = render_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags,
                                 eval_results=eval_results)
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        unchecked = [name for func, name in zip(self.reward_funcs, self.reward_func_names)
                     if not isinstance(func, (CheckedReward, torch.nn.Module))]
        calls = {name: func.calls for func, name in zip(self.reward_funcs, self.reward_func_names)
                 if isinstance(func, CheckedReward)}
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        unchecked += [name for func, name in zip(self.reward_funcs, self.reward_func_names)
                      if isinstance(func, CheckedReward) and func.calls == calls[name]]
        if unchecked:
            raise RuntimeError(f"FIPOTrainer's reward checks did not run for {unchecked}: this TRL version calls the "
                               "reward functions some other way, so non-finite or malformed rewards and the time "
                               f"limit would go unchecked. Install a TRL version fipo_trl supports "
                               f"({supported_range('trl')}).")
        return rewards_per_func

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
            raise FloatingPointError(_non_finite_loss_message(loss, dict.__getitem__(batch, "advantages"),
                                                              self.args.delta))
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
        if self.accelerator.num_processes > 1:  # each rank's batch stats are one row: the kernels' own reduction
            local = stack_stats(stats).to(self.accelerator.device, torch.float32)
            gathered = self.accelerator.gather(local[None]).view(-1, len(STAT_NAMES))
            stats = dict(zip(STAT_NAMES, reduce_row_stats(gathered).tolist()))  # one host transfer
        if any(isinstance(v, torch.Tensor) for v in stats.values()):
            stats = dict(zip(stats, stack_stats(stats).tolist()))  # one host transfer
        mode = "train" if self.model.training else "eval"
        if mode == "train" and self._fipo_inert_watch is not None:
            self._warn_if_inert(self._fipo_inert_watch.add(stats))
        for name, value in metrics_from_stats(stats).items():
            if not math.isnan(value):  # an extremum of an empty set: left out of this step, not logged as None
                self._metrics[mode][f"fipo/{name}"].append(value)
        self._metrics[mode]["fipo/fused_kernel"].append(float(fused))  # 1: a fused kernel (Triton or C), 0: torch

    def _warn_if_inert(self, figures: dict[str, float] | None) -> None:
        if figures is None or not self.is_world_process_zero():
            return
        args = self.args
        updates = args.steps_per_generation * args.num_iterations / args.gradient_accumulation_steps
        message = (
            f"FIPO is close to inert: over the last {args.fipo_inert_window} generation batches only "
            f"{figures['changed']:.1%} of response tokens had a weight f further than 1 % from 1 "
            f"(fipo/weight_changed_ratio; the warning threshold fipo_inert_threshold is {args.fipo_inert_threshold:g})"
            f", f mean {figures['mean']:.4f}, {figures['at_cap']:.1%} at the cap. The update is then nearly DAPO's. "
            "f moves only as far as the policy moves within a generation batch (docs/trainer.md has the figures). "
            "What raised it in our measurements: more optimizer updates per generation batch (now "
            f"{updates:g}; fipo_updates_per_generation: 2 -> 8 took SmolLM2-135M from 18 % to 45 %). A policy "
            "that stops moving because every group's rewards agree (advantage 0: a solved or too hard task) shows "
            "here too: check the reward std, or drop such groups with dynamic_sampling. A larger learning_rate "
            f"(now {args.learning_rate:g}) or fipo_decay_rate (now {args.fipo_decay_rate:g}) changed it little or "
            "not at all. "
            "Set fipo_inert_threshold=0 to silence this check."
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        logger.warning(message)
