"""A non-finite loss stops training before its backward pass, with the cause named: a NaN/inf step would poison every
weight of the model, and every checkpoint saved after it."""

from __future__ import annotations

import math

import torch


def non_finite_loss_error(loss: torch.Tensor, advantages: torch.Tensor, delta: float) -> FloatingPointError:
    """The error for a micro-batch whose loss is not finite: too large advantages, or a non-finite forward/reward."""
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
    return FloatingPointError(f"FIPOTrainer: the loss of this micro-batch is {loss.item()}; nothing was applied to "
                              f"the model, whose checkpoints are intact. Cause: {cause}.")
