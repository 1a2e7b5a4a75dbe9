"""The O(T) plain-torch path of the FIPO loss: what runs on CPU, and the reference the Triton kernels match.

The Future-KL F_t = sum_{j >= t} gamma^(j - t) x_j is a discounted *reverse* cumulative sum. The official code
builds it from chunked decay-matrix products on a log-ratio that still carries autograd, which keeps T x chunk
buffers alive. Here it is a blocked scan under ``no_grad``: a fixed (K x K) decay matrix inside blocks of K
tokens and the same scan, recursively, over the block carries. Memory is O(B*T), work O(B*T*K), every factor
is gamma^d <= 1 (no gamma^(-t) rescaling, so nothing overflows at T = 32K), and it is exact up to float
rounding.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Official masked means divide by (count + 1e-8) (verl ``masked_mean``); the loss does the same.
MASKED_MEAN_EPS = 1e-8
LOG_RATIO_CLAMP = 20.0
SCAN_BLOCK_SIZE = 64


class FIPOTorchResult(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable w.r.t. logps
    weights: torch.Tensor  # (B, T) detached influence weights f, after clip and safety rule
    future_kl: torch.Tensor  # (B, T) detached F
    keep: torch.Tensor  # (B,) bool, False for responses dropped by the sequence filter
    stats: dict[str, torch.Tensor]  # 0-dim sums / counts / extrema from which the metrics are formed


@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device):
    """TF32 would cost ~1e-3 relative error in F; keep fp32 matmuls exact on CUDA (no-op elsewhere)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def discounted_reverse_cumsum(x: torch.Tensor, gamma: float, block_size: int = SCAN_BLOCK_SIZE) -> torch.Tensor:
    """y[..., t] = sum_{j >= t} gamma^(j - t) * x[..., j] along the last dimension, in x's dtype.

    Blocked scan: y inside block m at offset i is the block-local sum plus gamma^(K - i) times y at the start of
    block m + 1, and the block starts themselves satisfy the same recursion with decay gamma^K.
    """
    T = x.shape[-1]
    if T <= 1:
        return x.clone()
    K = min(block_size, T)
    n_blocks = -(-T // K)
    blocks = F.pad(x, (0, n_blocks * K - T)).reshape(*x.shape[:-1], n_blocks, K)
    offsets = torch.arange(K, device=x.device)
    distance = offsets[:, None] - offsets[None, :]  # [j, i] = j - i
    decay = torch.where(
        distance >= 0,
        torch.pow(torch.tensor(gamma, dtype=torch.float64, device=x.device), distance.clamp(min=0)),
        0.0,
    ).to(x.dtype)
    with _ieee_fp32_matmul(x.device):
        y = blocks @ decay  # y[..., m, i] = sum_{j >= i in block m} gamma^(j - i) x_j
    if n_blocks > 1:
        at_block_start = discounted_reverse_cumsum(y[..., 0], gamma**K, block_size)
        carry = F.pad(at_block_start[..., 1:], (0, 1))  # y at the first token of the next block
        to_next_block = torch.pow(torch.tensor(gamma, dtype=torch.float64, device=x.device), K - offsets)
        y = y + carry[..., None] * to_next_block.to(x.dtype)
    return y.reshape(*x.shape[:-1], n_blocks * K)[..., :T]


def weight_bounds(clip_ratio: float, clip_high_only: bool) -> tuple[float, float]:
    """(lower, upper) clip bounds of f; clip_ratio == 0 means the official min(exp F, 10) with no lower bound."""
    if clip_ratio == 0:
        return 0.0, 10.0
    return (1.0 if clip_high_only else 1.0 - clip_ratio), 1.0 + clip_ratio


def fipo_loss_torch(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    clip_ratio: float,
    clip_high_only: bool,
    safety_threshold: float,
    dual_clip: float,
    epsilon_low: float,
    epsilon_high: float,
    block_size: int = SCAN_BLOCK_SIZE,
) -> FIPOTorchResult:
    """The official FIPO loss (SPEC §1.1) on validated inputs: logps/old_logps (B, T) of one float dtype,
    advantages (B,) or (B, T), mask (B, T) bool. Computes in float64 for float64 inputs, else float32."""
    dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=dtype, device=logps.device)
    adv = advantages.to(dtype)
    adv = torch.where(mask, adv[:, None] if adv.dim() == 1 else adv, zero)  # where, not *: NaN at padding stays out
    # The only differentiable quantity: delta, and through it the PPO ratio.
    log_ratio = torch.where(mask, (logps.to(dtype) - old_logps.to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), zero)

    with torch.no_grad():
        delta = log_ratio.detach()
        ratio = torch.exp(delta)
        participates = mask & (ratio <= dual_clip)  # any advantage sign (the official code)
        future_kl = discounted_reverse_cumsum(torch.where(participates, delta, zero), gamma, block_size)
        raw = torch.exp(future_kl)
        lower, upper = weight_bounds(clip_ratio, clip_high_only)
        clipped = raw.clamp(max=upper) if clip_ratio == 0 else raw.clamp(lower, upper)
        safety = (adv < 0) & (ratio > safety_threshold)
        weights = torch.where(safety, clipped.clamp(0.8, 1.0), clipped)
        weighted_adv = adv * weights

    ratio_grad = torch.exp(log_ratio)
    loss1 = -weighted_adv * ratio_grad
    loss2 = -weighted_adv * ratio_grad.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    clip_loss = torch.maximum(loss1, loss2)
    loss3 = -weighted_adv * dual_clip
    negative = weighted_adv < 0
    per_token_loss = torch.where(negative, torch.minimum(loss3, clip_loss), clip_loss)

    with torch.no_grad():
        dual_clipped = negative & (clip_loss.detach() > loss3) & mask
        keep = dual_clipped.sum(-1) <= 1
        final_mask = mask & keep[:, None]
        n_final = final_mask.sum().to(dtype)
    loss = torch.where(final_mask, per_token_loss, zero).sum() / (n_final + MASKED_MEAN_EPS)

    with torch.no_grad():
        stats = _stats(
            mask=mask, delta=delta, ratio=ratio, adv=adv, future_kl=future_kl, raw=raw, weights=weights,
            pg_clipped=(loss2.detach() > loss1.detach()) & mask, dual_clipped=dual_clipped, safety=safety & mask,
            participates=participates, keep=keep, n_final=n_final, lower=lower, upper=upper, dual_clip=dual_clip,
        )
    return FIPOTorchResult(loss, weights, future_kl, keep, stats)


def _stats(*, mask, delta, ratio, adv, future_kl, raw, weights, pg_clipped, dual_clipped, safety, participates,
           keep, n_final, lower, upper, dual_clip) -> dict[str, torch.Tensor]:
    """Sums, counts and extrema over response tokens (before the sequence filter, as the official metrics)."""
    dtype = delta.dtype
    inf = torch.tensor(float("inf"), dtype=dtype, device=delta.device)

    def count(flags):
        return (flags & mask).sum().to(dtype)

    def total(values):
        return torch.where(mask, values, 0).sum()

    def extreme(values, where, reduce, empty):
        return reduce(torch.where(where & mask, values, empty)) if values.numel() else empty

    negative, positive = adv < 0, adv > 0
    has_tokens = mask.any(-1)
    return {
        "n_tokens": mask.sum().to(dtype),
        "n_final_tokens": n_final,
        "sum_neg_log_ratio": total(-delta),
        "sum_future_kl": total(future_kl),
        "n_active": count(delta != 0),
        "n_filtered": count(~participates),
        "n_pg_clipped": count(pg_clipped),
        "n_dual_clipped": count(dual_clipped),
        "n_safety": count(safety),
        "sum_weight": total(weights),
        "min_weight": extreme(weights, mask, torch.min, inf),
        "max_weight": extreme(weights, mask, torch.max, -inf),
        "sum_raw_weight": total(raw),
        "min_raw_weight": extreme(raw, mask, torch.min, inf),
        "max_raw_weight": extreme(raw, mask, torch.max, -inf),
        "n_upper_clipped": count(weights >= upper - 1e-7),
        "n_lower_clipped": count(weights <= lower + 1e-7),
        "n_neg_ratio_2_3": count(negative & (ratio >= 2) & (ratio < 3)),
        "n_neg_ratio_3_4": count(negative & (ratio >= 3) & (ratio < 4)),
        "n_neg_ratio_4_c": count(negative & (ratio >= 4) & (ratio < dual_clip)),
        "n_pos_mini": count(positive & (ratio < 1e-3)),
        "max_neg_ratio": extreme(ratio, negative, torch.max, -inf),
        "max_pos_ratio": extreme(ratio, positive, torch.max, -inf),
        "min_pos_ratio": extreme(ratio, positive, torch.min, inf),
        "n_rows": has_tokens.sum().to(dtype),
        "n_dropped_rows": (has_tokens & ~keep).sum().to(dtype),
    }
