"""Liger-style fused FIPO kernels in Triton: one program per row, one read of the inputs, no T x T buffers.

Layout (as Liger's ``ops/*.py``): the ``@triton.jit`` kernel, small launchers, one ``torch.autograd.Function``.

``_fipo_row_kernel`` walks a row in blocks of ``BLOCK`` tokens from its END, so the discounted reverse scan
F_t = x_t + gamma * F_{t+1} becomes a FORWARD ``tl.associative_scan`` over reversed offsets plus a scalar carry
(``reverse=True`` is avoided: triton issue #4362). Everything else is elementwise in registers: the clamped
log-ratio, the participation filter, exp/clip/safety rule of the weight, the dual-clip PPO loss, its gradient
w.r.t. logps and the per-row partial sums the metrics need. Accumulation is fp32 whatever the input dtype.

Two entry points share the kernel:
- ``fipo_weights_triton``: weights f, weighted advantages A * f, F, keep and stats (and the loss value), nothing
  stored for autograd;
- ``FIPOLossFunction`` / ``fipo_loss_triton``: the official loss; the forward also writes the unscaled per-token
  gradient, the backward only scales it by keep_b / (kept tokens + 1e-8) and the incoming gradient.
Both return the ``FIPOTorchResult`` contract of ``fipo_torch.fipo_loss_torch`` (same stats keys and semantics).
"""

from __future__ import annotations

import math
import os

import torch

from .fipo_torch import LOG_RATIO_CLAMP, MASKED_MEAN_EPS, FIPOTorchResult, weight_bounds

try:
    import triton
    import triton.language as tl
    from liger_kernel.ops.utils import calculate_settings, ensure_contiguous

    TRITON_AVAILABLE = True
except ImportError:  # no triton (or no liger): the torch path still works
    TRITON_AVAILABLE = False

    def ensure_contiguous(fn):
        return fn

# Triton decides between a GPU driver and the CPU interpreter when the kernels are defined (at import).
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEFAULT_BLOCK_SIZE = 1024  # tokens per block on GPU; a row loops over cdiv(T, BLOCK) blocks

# Columns of the per-row partial-sum buffer written by the kernel (fp32, one row per sequence).
ROW_STAT_COLUMNS = (
    "n_tokens", "n_dual_clipped", "loss_sum", "sum_neg_log_ratio", "sum_future_kl", "n_active", "n_filtered",
    "n_pg_clipped", "n_safety", "sum_weight", "min_weight", "max_weight", "sum_raw_weight", "min_raw_weight",
    "max_raw_weight", "n_upper_clipped", "n_lower_clipped", "n_neg_ratio_2_3", "n_neg_ratio_3_4", "n_neg_ratio_4_c",
    "n_pos_mini", "max_neg_ratio", "max_pos_ratio", "min_pos_ratio",
)
N_ROW_STATS = len(ROW_STAT_COLUMNS)
_STATS_KEYS = ("n_tokens", "n_final_tokens", "sum_neg_log_ratio", "sum_future_kl", "n_active", "n_filtered",
               "n_pg_clipped", "n_dual_clipped", "n_safety", "sum_weight", "min_weight", "max_weight",
               "sum_raw_weight", "min_raw_weight", "max_raw_weight", "n_upper_clipped", "n_lower_clipped",
               "n_neg_ratio_2_3", "n_neg_ratio_3_4", "n_neg_ratio_4_c", "n_pos_mini", "max_neg_ratio",
               "max_pos_ratio", "min_pos_ratio", "n_rows", "n_dropped_rows")

_COLUMN = {name: i for i, name in enumerate(ROW_STAT_COLUMNS)}


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device`` in this process."""
    if not TRITON_AVAILABLE:
        return False
    return device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRETED)


if TRITON_AVAILABLE:

    @triton.jit
    def _discounted_combine(log2_decay_a, value_a, log2_decay_b, value_b):
        # (a then b): y = y_b + gamma^(n_b) * y_a. The decay is carried as a log2 exponent, not as a product of
        # rounded gammas: exp2(n * log2 gamma) keeps gamma^n accurate to a few ulp for any distance n.
        return log2_decay_a + log2_decay_b, value_b + tl.exp2(log2_decay_b) * value_a

    @triton.jit
    def _fipo_row_kernel(
        LOGPS, OLD_LOGPS, ADVANTAGES, MASK,  # inputs: (B, T), (B, T), (B,) or (B, T), (B, T) uint8
        WEIGHTS, FUTURE_KL, WEIGHTED_ADV, GRAD, ROW_STATS,  # outputs: (B, T) fp32 x 4 (GRAD if STORE_GRAD), (B, N_STATS)
        T, stride_logps, stride_old, stride_adv_row, stride_adv_col, stride_mask,
        log2_gamma, log_ratio_clamp, clip_lower, clip_upper, upper_clip_at, lower_clip_at, safety_threshold, dual_clip,
        ratio_low, ratio_high,
        UPPER_ONLY: tl.constexpr,  # clip_ratio == 0: min(exp F, 10), no lower bound
        STORE_GRAD: tl.constexpr,
        N_STATS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, BLOCK)
        # lane i of block k holds position T - 1 - (k * BLOCK + i): a forward scan over lanes runs backwards in t
        carry_decay = tl.exp2((lane + 1).to(tl.float32) * log2_gamma)  # gamma^(i + 1): reach of F_{block end + 1}
        zero = tl.full([], 0.0, tl.float32)
        inf = tl.full([], float("inf"), tl.float32)
        carry = zero  # F at the first position of the previous (later-in-time) block
        n_tokens = zero
        n_dual = zero
        loss_sum = zero
        sum_neg_log_ratio = zero
        sum_future_kl = zero
        n_active = zero
        n_filtered = zero
        n_pg_clipped = zero
        n_safety = zero
        sum_weight = zero
        min_weight = inf
        max_weight = -inf
        sum_raw = zero
        min_raw = inf
        max_raw = -inf
        n_upper = zero
        n_lower = zero
        n_neg_2_3 = zero
        n_neg_3_4 = zero
        n_neg_4_c = zero
        n_pos_mini = zero
        max_neg_ratio = -inf
        max_pos_ratio = -inf
        min_pos_ratio = inf

        for block in range(0, tl.cdiv(T, BLOCK)):
            pos = T - 1 - block * BLOCK - lane
            in_row = pos >= 0
            mask = tl.load(MASK + row * stride_mask + pos, mask=in_row, other=0) != 0
            logp = tl.load(LOGPS + row * stride_logps + pos, mask=mask, other=0.0).to(tl.float32)
            old = tl.load(OLD_LOGPS + row * stride_old + pos, mask=mask, other=0.0).to(tl.float32)
            adv = tl.load(ADVANTAGES + row * stride_adv_row + pos * stride_adv_col, mask=mask, other=0.0)
            adv = tl.where(mask, adv.to(tl.float32), 0.0)  # where, not *: NaN advantages at padding stay out

            raw_delta = logp - old
            delta = tl.where(mask, tl.minimum(tl.maximum(raw_delta, -log_ratio_clamp), log_ratio_clamp), 0.0)
            ratio = tl.exp(delta)
            participates = mask & (ratio <= dual_clip)
            x = tl.where(participates, delta, 0.0)

            # reverse discounted scan of this block (forward over lanes), then the later blocks through the carry
            _, local = tl.associative_scan((tl.full([BLOCK], 0.0, tl.float32) + log2_gamma, x), 0,
                                           _discounted_combine)
            future_kl = local + carry_decay * carry
            carry = tl.sum(tl.where(lane == BLOCK - 1, future_kl, 0.0), 0)

            raw = tl.exp(future_kl)
            if UPPER_ONLY:
                clipped = tl.minimum(raw, clip_upper)
            else:
                clipped = tl.minimum(tl.maximum(raw, clip_lower), clip_upper)
            negative_adv = adv < 0
            safety = negative_adv & (ratio > safety_threshold)
            weight = tl.where(safety, tl.minimum(tl.maximum(clipped, 0.8), 1.0), clipped)
            tl.store(WEIGHTS + row * T + pos, weight, mask=in_row)
            tl.store(FUTURE_KL + row * T + pos, future_kl, mask=in_row)

            # dual-clip PPO surrogate on the weighted advantage (same operation order as the torch path)
            weighted_adv = adv * weight
            tl.store(WEIGHTED_ADV + row * T + pos, weighted_adv, mask=in_row)
            loss1 = -weighted_adv * ratio
            loss2 = -weighted_adv * tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
            clip_loss = tl.maximum(loss1, loss2)
            loss3 = -weighted_adv * dual_clip
            negative = weighted_adv < 0
            token_loss = tl.where(negative, tl.minimum(loss3, clip_loss), clip_loss)
            loss_sum += tl.sum(tl.where(mask, token_loss, 0.0), 0)
            dual_clipped = negative & (clip_loss > loss3) & mask
            if STORE_GRAD:
                # d loss / d logp before the 1 / (kept tokens) scale: only the ratio carries gradient
                ratio_live = tl.where(weighted_adv >= 0, ratio < ratio_high, (ratio > ratio_low) & (ratio < dual_clip))
                live = mask & ratio_live & (tl.abs(raw_delta) <= log_ratio_clamp)
                tl.store(GRAD + row * T + pos, tl.where(live, -weighted_adv * ratio, 0.0), mask=in_row)

            # per-row partial sums for the metrics (response tokens, before the sequence filter)
            ones = mask.to(tl.float32)
            positive_adv = adv > 0
            n_tokens += tl.sum(ones, 0)
            n_dual += tl.sum(dual_clipped.to(tl.float32), 0)
            sum_neg_log_ratio += tl.sum(-delta, 0)
            sum_future_kl += tl.sum(tl.where(mask, future_kl, 0.0), 0)
            n_active += tl.sum((mask & (delta != 0)).to(tl.float32), 0)
            n_filtered += tl.sum((mask & ~participates).to(tl.float32), 0)
            n_pg_clipped += tl.sum((mask & (loss2 > loss1)).to(tl.float32), 0)
            n_safety += tl.sum((mask & safety).to(tl.float32), 0)
            sum_weight += tl.sum(tl.where(mask, weight, 0.0), 0)
            min_weight = tl.minimum(min_weight, tl.min(tl.where(mask, weight, inf), 0))
            max_weight = tl.maximum(max_weight, tl.max(tl.where(mask, weight, -inf), 0))
            sum_raw += tl.sum(tl.where(mask, raw, 0.0), 0)
            min_raw = tl.minimum(min_raw, tl.min(tl.where(mask, raw, inf), 0))
            max_raw = tl.maximum(max_raw, tl.max(tl.where(mask, raw, -inf), 0))
            n_upper += tl.sum((mask & (weight >= upper_clip_at)).to(tl.float32), 0)
            n_lower += tl.sum((mask & (weight <= lower_clip_at)).to(tl.float32), 0)
            neg_mask = mask & negative_adv
            pos_mask = mask & positive_adv
            n_neg_2_3 += tl.sum((neg_mask & (ratio >= 2.0) & (ratio < 3.0)).to(tl.float32), 0)
            n_neg_3_4 += tl.sum((neg_mask & (ratio >= 3.0) & (ratio < 4.0)).to(tl.float32), 0)
            n_neg_4_c += tl.sum((neg_mask & (ratio >= 4.0) & (ratio < dual_clip)).to(tl.float32), 0)
            n_pos_mini += tl.sum((pos_mask & (ratio < 1e-3)).to(tl.float32), 0)
            max_neg_ratio = tl.maximum(max_neg_ratio, tl.max(tl.where(neg_mask, ratio, -inf), 0))
            max_pos_ratio = tl.maximum(max_pos_ratio, tl.max(tl.where(pos_mask, ratio, -inf), 0))
            min_pos_ratio = tl.minimum(min_pos_ratio, tl.min(tl.where(pos_mask, ratio, inf), 0))

        out = ROW_STATS + row * N_STATS  # column order: ROW_STAT_COLUMNS
        tl.store(out + 0, n_tokens)
        tl.store(out + 1, n_dual)
        tl.store(out + 2, loss_sum)
        tl.store(out + 3, sum_neg_log_ratio)
        tl.store(out + 4, sum_future_kl)
        tl.store(out + 5, n_active)
        tl.store(out + 6, n_filtered)
        tl.store(out + 7, n_pg_clipped)
        tl.store(out + 8, n_safety)
        tl.store(out + 9, sum_weight)
        tl.store(out + 10, min_weight)
        tl.store(out + 11, max_weight)
        tl.store(out + 12, sum_raw)
        tl.store(out + 13, min_raw)
        tl.store(out + 14, max_raw)
        tl.store(out + 15, n_upper)
        tl.store(out + 16, n_lower)
        tl.store(out + 17, n_neg_2_3)
        tl.store(out + 18, n_neg_3_4)
        tl.store(out + 19, n_neg_4_c)
        tl.store(out + 20, n_pos_mini)
        tl.store(out + 21, max_neg_ratio)
        tl.store(out + 22, max_pos_ratio)
        tl.store(out + 23, min_pos_ratio)


def _require_triton(device: torch.device) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError("fipo_trl: the Triton backend needs `triton` and `liger-kernel`; install them or use "
                           "backend='torch'.")
    if not triton_usable(device):
        raise RuntimeError(
            f"fipo_trl: the Triton backend cannot run on {device} tensors in this process. It needs CUDA tensors, "
            "or CPU tensors with TRITON_INTERPRET=1 set before fipo_trl is imported (the Triton CPU interpreter, for "
            "tests). Use backend='torch' (or 'auto') on CPU."
        )


def _launch_row_kernel(logps, old_logps, advantages, mask, *, gamma, clip_ratio, clip_high_only, safety_threshold,
                       dual_clip, epsilon_low, epsilon_high, store_grad, block_size):
    """Run the row kernel; returns weights, future_kl, A * f, grad (or None) and the (B, N_ROW_STATS) partial sums."""
    _require_triton(logps.device)
    if logps.dtype == torch.float64:
        raise TypeError("fipo_trl: the Triton backend computes in float32; float64 inputs (the reference dtype) "
                        "go through backend='torch'.")
    B, T = logps.shape
    device = logps.device
    weights = torch.empty(B, T, dtype=torch.float32, device=device)
    future_kl, weighted_adv = torch.empty_like(weights), torch.empty_like(weights)
    grad = torch.empty_like(weights) if store_grad else weights  # placeholder pointer when not stored
    row_stats = torch.empty(B, N_ROW_STATS, dtype=torch.float32, device=device)
    if B == 0:
        return weights, future_kl, weighted_adv, (grad if store_grad else None), row_stats
    if block_size is None:
        block_size = min(DEFAULT_BLOCK_SIZE, triton.next_power_of_2(max(T, 16)))
    _, num_warps = calculate_settings(block_size)
    lower, upper = weight_bounds(clip_ratio, clip_high_only)
    mask_bytes = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    adv_col_stride = advantages.stride(1) if advantages.dim() == 2 else 0
    _fipo_row_kernel[(B,)](
        logps, old_logps, advantages, mask_bytes,
        weights, future_kl, weighted_adv, grad, row_stats,
        T, logps.stride(0), old_logps.stride(0), advantages.stride(0), adv_col_stride, mask_bytes.stride(0),
        math.log2(gamma), LOG_RATIO_CLAMP, lower, upper, upper - 1e-7, lower + 1e-7, safety_threshold, dual_clip,
        1.0 - epsilon_low, 1.0 + epsilon_high,
        UPPER_ONLY=clip_ratio == 0, STORE_GRAD=store_grad, N_STATS=N_ROW_STATS, BLOCK=block_size,
        num_warps=num_warps,
    )
    return weights, future_kl, weighted_adv, (grad if store_grad else None), row_stats


def _reduce_row_stats(row_stats: torch.Tensor):
    """Row partial sums -> (keep, n_final, loss_sum, stats dict with the keys and semantics of ``fipo_torch._stats``)."""
    # an identity row (0 for sums, +inf for minima, -inf for maxima) keeps B = 0 well defined
    identity = torch.zeros(1, N_ROW_STATS, dtype=row_stats.dtype, device=row_stats.device)
    for name in ROW_STAT_COLUMNS:
        if name.startswith(("min_", "max_")):
            identity[0, _COLUMN[name]] = math.inf if name.startswith("min_") else -math.inf
    padded = torch.cat([row_stats, identity])
    sums, minima, maxima = padded.sum(0), padded.amin(0), padded.amax(0)

    def column(name):
        index = _COLUMN[name]
        return minima[index] if name.startswith("min_") else maxima[index] if name.startswith("max_") else sums[index]

    row_tokens = row_stats[:, _COLUMN["n_tokens"]]
    keep = row_stats[:, _COLUMN["n_dual_clipped"]] <= 1
    has_tokens = row_tokens > 0
    n_final = torch.where(keep, row_tokens, 0).sum()
    loss_sum = torch.where(keep, row_stats[:, _COLUMN["loss_sum"]], 0).sum()
    derived = {
        "n_final_tokens": n_final,
        "n_rows": has_tokens.sum().to(row_stats.dtype),
        "n_dropped_rows": (has_tokens & ~keep).sum().to(row_stats.dtype),
    }
    stats = {name: derived[name] if name in derived else column(name) for name in _STATS_KEYS}
    return keep, n_final, loss_sum, stats


def fipo_weights_triton(logps, old_logps, advantages, mask, *, gamma, clip_ratio, clip_high_only, safety_threshold,
                        dual_clip, epsilon_low, epsilon_high, block_size=None) -> FIPOTorchResult:
    """The fused weight kernel: f, F, keep, stats and the loss VALUE (no gradient, nothing kept for autograd)."""
    logps, old_logps, advantages, mask = (t.detach().contiguous() for t in (logps, old_logps, advantages, mask))
    weights, future_kl, weighted_adv, _, row_stats = _launch_row_kernel(
        logps, old_logps, advantages, mask, gamma=gamma, clip_ratio=clip_ratio, clip_high_only=clip_high_only,
        safety_threshold=safety_threshold, dual_clip=dual_clip, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
        store_grad=False, block_size=block_size,
    )
    keep, n_final, loss_sum, stats = _reduce_row_stats(row_stats)
    return FIPOTorchResult(loss_sum / (n_final + MASKED_MEAN_EPS), weights, future_kl, keep, stats, weighted_adv)


class FIPOLossFunction(torch.autograd.Function if TRITON_AVAILABLE else object):
    """Forward: the official loss and its gradient w.r.t. logps in one kernel pass. Backward: one scale."""

    @staticmethod
    @ensure_contiguous
    def forward(ctx, logps, old_logps, advantages, mask, hyperparameters: dict, block_size):
        weights, future_kl, weighted_adv, grad, row_stats = _launch_row_kernel(
            logps, old_logps, advantages, mask, store_grad=True, block_size=block_size, **hyperparameters
        )
        keep, n_final, loss_sum, stats = _reduce_row_stats(row_stats)
        denominator = n_final + MASKED_MEAN_EPS
        row_scale = keep.to(torch.float32) / denominator  # sequence filter and token mean, per row
        ctx.save_for_backward(grad, row_scale)
        ctx.logps_dtype = logps.dtype
        packed_stats = torch.stack(list(stats.values()))
        ctx.mark_non_differentiable(weights, future_kl, keep, packed_stats, weighted_adv)
        return loss_sum / denominator, weights, future_kl, keep, packed_stats, weighted_adv

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        grad, row_scale = ctx.saved_tensors
        grad_logps = grad * (grad_loss * row_scale)[:, None]
        return grad_logps.to(ctx.logps_dtype), None, None, None, None, None


def fipo_loss_triton(logps, old_logps, advantages, mask, *, gamma, clip_ratio, clip_high_only, safety_threshold,
                     dual_clip, epsilon_low, epsilon_high, block_size=None) -> FIPOTorchResult:
    """The official FIPO loss (SPEC §1.1) through the fused kernel; same inputs and result as ``fipo_loss_torch``.
    Computes in float32 (bf16/fp16/fp32 inputs); the gradient w.r.t. logps comes back in logps' dtype."""
    hyperparameters = dict(gamma=gamma, clip_ratio=clip_ratio, clip_high_only=clip_high_only,
                           safety_threshold=safety_threshold, dual_clip=dual_clip, epsilon_low=epsilon_low,
                           epsilon_high=epsilon_high)
    if not (torch.is_grad_enabled() and logps.requires_grad):
        return fipo_weights_triton(logps, old_logps, advantages, mask, block_size=block_size, **hyperparameters)
    _require_triton(logps.device)
    loss, weights, future_kl, keep, packed, weighted_adv = FIPOLossFunction.apply(
        logps, old_logps.detach(), advantages.detach(), mask, hyperparameters, block_size
    )
    return FIPOTorchResult(loss, weights, future_kl, keep, dict(zip(_STATS_KEYS, packed.unbind(0))), weighted_adv)


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "FIPOLossFunction",
    "TRITON_AVAILABLE",
    "TRITON_INTERPRETED",
    "fipo_loss_triton",
    "fipo_weights_triton",
    "triton_usable",
]
