"""The fused FIPO path in Triton (the CUDA path): one program per row, one read of the inputs, no T x T buffers.

``_fipo_row_kernel`` walks a row in blocks of ``BLOCK`` tokens from its END, so the discounted reverse scan
F_t = x_t + gamma * F_{t+1} becomes a FORWARD ``tl.associative_scan`` over reversed offsets plus a scalar carry
(``reverse=True`` is avoided: triton issue #4362). Everything else is elementwise in registers: the clamped
log-ratio, the participation filter, exp/clip/safety rule of the weight, the dual-clip PPO loss, its gradient
w.r.t. logps and the row's stats. Accumulation is fp32 whatever the input dtype.

The kernel writes f, A * f, F, keep, one row of ``common.ROW_STATS`` per sequence (column order from that list) and,
when asked, each row's loss sum and the unscaled per-token gradient; ``common.result_from_rows`` reduces the rows and
attaches the loss (``common.LossWithStoredGradient``: the backward only scales the stored gradient). Importable
without triton or a GPU (``TRITON_AVAILABLE`` is then False); needs nothing beyond triton itself.
"""

from __future__ import annotations

import math
import os
import types

import torch

from .common import (
    COLUMN,
    LOG_RATIO_CLAMP,
    N_STATS,
    NEG_RATIO_EDGES,
    POS_MINI_RATIO,
    SAFETY_WEIGHT_RANGE,
    FIPOResult,
    Hyperparameters,
    needs_gradient,
    result_from_rows,
)

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # no triton: the torch path still works
    TRITON_AVAILABLE = False

# Triton decides between a GPU driver and the CPU interpreter when the kernels are defined (at import).
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEFAULT_BLOCK_SIZE = 1024  # tokens per block on GPU; a row loops over cdiv(T, BLOCK) blocks


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device`` in this process."""
    if not TRITON_AVAILABLE:
        return False
    return device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRETED)


def warps_for(block_size: int) -> int:
    """Warps per program for a block of ``block_size`` tokens (the usual rule: 4 below 2K tokens, then more)."""
    return 4 if block_size < 2048 else 8 if block_size < 8192 else 16


if TRITON_AVAILABLE:
    # A Triton kernel reads only constexpr globals and modules: each row-stat column's index as COLUMNS.<name>, a
    # module generated from common.ROW_STATS, and the shared constants.
    COLUMNS = types.ModuleType("row_stat_columns")
    for _name, _index in COLUMN.items():
        setattr(COLUMNS, _name, tl.constexpr(_index))
    _LOG_RATIO_CLAMP = tl.constexpr(LOG_RATIO_CLAMP)
    _SAFETY_MIN, _SAFETY_MAX = (tl.constexpr(v) for v in SAFETY_WEIGHT_RANGE)
    _NEG_EDGE_0, _NEG_EDGE_1, _NEG_EDGE_2 = (tl.constexpr(v) for v in NEG_RATIO_EDGES)
    _POS_MINI_RATIO = tl.constexpr(POS_MINI_RATIO)

    @triton.jit
    def _discounted_combine(log2_decay_a, value_a, log2_decay_b, value_b):
        # (a then b): y = y_b + gamma^(n_b) * y_a. The decay is carried as a log2 exponent, not as a product of
        # rounded gammas: exp2(n * log2 gamma) keeps gamma^n accurate to a few ulp for any distance n.
        return log2_decay_a + log2_decay_b, value_b + tl.exp2(log2_decay_b) * value_a

    @triton.jit
    def _fipo_row_kernel(
        LOGPS, OLD_LOGPS, ADVANTAGES, MASK,  # inputs: (B, T), (B, T), (B,) or (B, T), (B, T) uint8
        WEIGHTS, FUTURE_KL, WEIGHTED_ADV, GRAD,  # outputs: (B, T) fp32 each (GRAD only if STORE_GRAD)
        KEEP, ROW_LOSS, ROW_STATS,  # outputs: (B,) int8, (B,) fp32 (only if STORE_LOSS), (B, N_STATS) fp32
        T, stride_logps, stride_old, stride_adv_row, stride_adv_col, stride_mask,
        log2_gamma, clip_lower, clip_upper, lower_clipped_at, upper_clipped_at, safety_threshold, delta,
        ratio_low, ratio_high,
        UPPER_ONLY: tl.constexpr,  # clip_ratio == 0: min(exp F, 10), no lower bound
        STORE_LOSS: tl.constexpr,
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
            log_ratio = tl.where(mask, tl.minimum(tl.maximum(raw_delta, -_LOG_RATIO_CLAMP), _LOG_RATIO_CLAMP), 0.0)
            ratio = tl.exp(log_ratio)
            participates = mask & (ratio <= delta)
            x = tl.where(participates, log_ratio, 0.0)

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
            weight = tl.where(safety, tl.minimum(tl.maximum(clipped, _SAFETY_MIN), _SAFETY_MAX), clipped)
            tl.store(WEIGHTS + row * T + pos, weight, mask=in_row)
            tl.store(FUTURE_KL + row * T + pos, future_kl, mask=in_row)

            # dual-clip PPO surrogate on the weighted advantage (same operation order as the C kernel)
            weighted_adv = adv * weight
            tl.store(WEIGHTED_ADV + row * T + pos, weighted_adv, mask=in_row)
            loss1 = -weighted_adv * ratio
            loss2 = -weighted_adv * tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
            clip_loss = tl.maximum(loss1, loss2)
            loss3 = -weighted_adv * delta
            negative = weighted_adv < 0
            if STORE_LOSS:
                token_loss = tl.where(negative, tl.minimum(loss3, clip_loss), clip_loss)
                loss_sum += tl.sum(tl.where(mask, token_loss, 0.0), 0)
            dual_clipped = negative & (clip_loss > loss3) & mask
            if STORE_GRAD:
                # d loss / d logp before the 1 / (kept tokens) scale: only the ratio carries gradient
                ratio_live = tl.where(weighted_adv >= 0, ratio < ratio_high, (ratio > ratio_low) & (ratio < delta))
                live = mask & ratio_live & (tl.abs(raw_delta) <= _LOG_RATIO_CLAMP)
                tl.store(GRAD + row * T + pos, tl.where(live, -weighted_adv * ratio, 0.0), mask=in_row)

            # the row's stats (response tokens, before the sequence filter)
            ones = mask.to(tl.float32)
            positive_adv = adv > 0
            n_tokens += tl.sum(ones, 0)
            n_dual += tl.sum(dual_clipped.to(tl.float32), 0)
            sum_neg_log_ratio += tl.sum(-log_ratio, 0)
            sum_future_kl += tl.sum(tl.where(mask, future_kl, 0.0), 0)
            n_active += tl.sum((mask & (log_ratio != 0)).to(tl.float32), 0)
            n_filtered += tl.sum((mask & ~participates).to(tl.float32), 0)
            n_pg_clipped += tl.sum((mask & (loss2 > loss1)).to(tl.float32), 0)
            n_safety += tl.sum((mask & safety).to(tl.float32), 0)
            sum_weight += tl.sum(tl.where(mask, weight, 0.0), 0)
            min_weight = tl.minimum(min_weight, tl.min(tl.where(mask, weight, inf), 0))
            max_weight = tl.maximum(max_weight, tl.max(tl.where(mask, weight, -inf), 0))
            sum_raw += tl.sum(tl.where(mask, raw, 0.0), 0)
            min_raw = tl.minimum(min_raw, tl.min(tl.where(mask, raw, inf), 0))
            max_raw = tl.maximum(max_raw, tl.max(tl.where(mask, raw, -inf), 0))
            n_upper += tl.sum((mask & (weight >= upper_clipped_at)).to(tl.float32), 0)
            n_lower += tl.sum((mask & (weight <= lower_clipped_at)).to(tl.float32), 0)
            neg_mask = mask & negative_adv
            pos_mask = mask & positive_adv
            n_neg_2_3 += tl.sum((neg_mask & (ratio >= _NEG_EDGE_0) & (ratio < _NEG_EDGE_1)).to(tl.float32), 0)
            n_neg_3_4 += tl.sum((neg_mask & (ratio >= _NEG_EDGE_1) & (ratio < _NEG_EDGE_2)).to(tl.float32), 0)
            n_neg_4_c += tl.sum((neg_mask & (ratio >= _NEG_EDGE_2) & (ratio < delta)).to(tl.float32), 0)
            n_pos_mini += tl.sum((pos_mask & (ratio < _POS_MINI_RATIO)).to(tl.float32), 0)
            max_neg_ratio = tl.maximum(max_neg_ratio, tl.max(tl.where(neg_mask, ratio, -inf), 0))
            max_pos_ratio = tl.maximum(max_pos_ratio, tl.max(tl.where(pos_mask, ratio, -inf), 0))
            min_pos_ratio = tl.minimum(min_pos_ratio, tl.min(tl.where(pos_mask, ratio, inf), 0))

        # the sequence filter (docs/algorithm.md §1.7): more than one dual-clipped token drops the row
        kept = n_dual <= 1
        has_tokens = n_tokens > 0
        tl.store(KEEP + row, kept.to(tl.int8))
        if STORE_LOSS:
            tl.store(ROW_LOSS + row, loss_sum)
        out = ROW_STATS + row * N_STATS
        tl.store(out + COLUMNS.n_tokens, n_tokens)
        tl.store(out + COLUMNS.n_final_tokens, tl.where(kept, n_tokens, 0.0))
        tl.store(out + COLUMNS.sum_neg_log_ratio, sum_neg_log_ratio)
        tl.store(out + COLUMNS.sum_future_kl, sum_future_kl)
        tl.store(out + COLUMNS.n_active, n_active)
        tl.store(out + COLUMNS.n_filtered, n_filtered)
        tl.store(out + COLUMNS.n_pg_clipped, n_pg_clipped)
        tl.store(out + COLUMNS.n_dual_clipped, n_dual)
        tl.store(out + COLUMNS.n_safety, n_safety)
        tl.store(out + COLUMNS.sum_weight, sum_weight)
        tl.store(out + COLUMNS.min_weight, min_weight)
        tl.store(out + COLUMNS.max_weight, max_weight)
        tl.store(out + COLUMNS.sum_raw_weight, sum_raw)
        tl.store(out + COLUMNS.min_raw_weight, min_raw)
        tl.store(out + COLUMNS.max_raw_weight, max_raw)
        tl.store(out + COLUMNS.n_upper_clipped, n_upper)
        tl.store(out + COLUMNS.n_lower_clipped, n_lower)
        tl.store(out + COLUMNS.n_neg_ratio_2_3, n_neg_2_3)
        tl.store(out + COLUMNS.n_neg_ratio_3_4, n_neg_3_4)
        tl.store(out + COLUMNS.n_neg_ratio_4_c, n_neg_4_c)
        tl.store(out + COLUMNS.n_pos_mini, n_pos_mini)
        tl.store(out + COLUMNS.max_neg_ratio, max_neg_ratio)
        tl.store(out + COLUMNS.max_pos_ratio, max_pos_ratio)
        tl.store(out + COLUMNS.min_pos_ratio, min_pos_ratio)
        tl.store(out + COLUMNS.n_rows, has_tokens.to(tl.float32))
        tl.store(out + COLUMNS.n_dropped_rows, (has_tokens & ~kept).to(tl.float32))


def _require_triton(device: torch.device) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError("fipo_trl: the Triton backend needs `triton`; install it or use backend='torch'.")
    if not triton_usable(device):
        raise RuntimeError(
            f"fipo_trl: the Triton backend cannot run on {device} tensors in this process. It needs CUDA tensors, "
            "or CPU tensors with TRITON_INTERPRET=1 set before fipo_trl is imported (the Triton CPU interpreter, for "
            "tests). Use backend='torch' (or 'auto') on CPU."
        )


def compute_triton(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   hyperparameters: Hyperparameters, *, with_loss: bool = True,
                   block_size: int | None = None) -> FIPOResult:
    """FIPO (docs/algorithm.md §1) through the fused kernel; same inputs and result as ``fipo_torch.compute_torch``.
    Computes in float32 (bf16/fp16/fp32 inputs); the gradient w.r.t. logps comes back in logps' dtype.
    ``with_loss=False``: no loss sums and no gradient are computed (constexpr switches of the kernel)."""
    _require_triton(logps.device)
    if logps.dtype == torch.float64:
        raise TypeError("fipo_trl: the Triton backend computes in float32; float64 inputs (the reference dtype) "
                        "go through backend='torch'.")
    store_grad = needs_gradient(logps, with_loss)
    logps_leaf = logps
    logps, old_logps, advantages, mask = (t.detach().contiguous() for t in (logps, old_logps, advantages, mask))
    B, T = logps.shape
    device = logps.device
    weights = torch.empty(B, T, dtype=torch.float32, device=device)
    future_kl, weighted_adv = torch.empty_like(weights), torch.empty_like(weights)
    grad = torch.empty_like(weights) if store_grad else None
    row_loss = torch.empty(B, dtype=torch.float32, device=device) if with_loss else None
    keep = torch.empty(B, dtype=torch.bool, device=device)
    row_stats = torch.empty(B, N_STATS, dtype=torch.float32, device=device)
    if B > 0:
        block_size = block_size or min(DEFAULT_BLOCK_SIZE, triton.next_power_of_2(max(T, 16)))
        h = hyperparameters
        mask_bytes = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        _fipo_row_kernel[(B,)](
            logps, old_logps, advantages, mask_bytes,
            weights, future_kl, weighted_adv, weights if grad is None else grad,  # placeholder pointers when unused
            keep.view(torch.int8), weights if row_loss is None else row_loss, row_stats,
            T, logps.stride(0), old_logps.stride(0), advantages.stride(0),
            advantages.stride(1) if advantages.dim() == 2 else 0, mask_bytes.stride(0),
            math.log2(h.gamma), *h.weight_bounds, *h.clipped_at, h.safety_threshold, h.delta, *h.ratio_bounds,
            UPPER_ONLY=h.clip_ratio == 0, STORE_LOSS=with_loss, STORE_GRAD=store_grad, N_STATS=N_STATS,
            BLOCK=block_size, num_warps=warps_for(block_size),
        )
    return result_from_rows(logps_leaf, weights=weights, weighted_advantages=weighted_adv, future_kl=future_kl,
                            keep=keep, row_stats=row_stats, row_loss=row_loss, unscaled_grad=grad,
                            stats_on_host=False)


__all__ = ["DEFAULT_BLOCK_SIZE", "TRITON_AVAILABLE", "TRITON_INTERPRETED", "compute_triton", "triton_usable"]
