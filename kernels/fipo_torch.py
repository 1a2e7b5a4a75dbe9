"""The FIPO compute path in plain torch (docs/algorithm.md §1.1-1.9): float64 inputs (the reference dtype) on any
device, and the fallback wherever a fused path is unavailable (CPU without a C compiler or with
FIPO_TRL_CPU_KERNEL=0, CUDA without Triton).

O(T) memory: the Future-KL is ``scan.discounted_reverse_cumsum``, the blocked scan, under ``no_grad``.

Speed on CPU: comparisons, ``torch.where`` and bool reductions are 5-20x slower there than float arithmetic
(a bool ``where`` over 164K tokens costs ~230 us, a float multiply ~10 us), so everything is float arithmetic on
0/1 indicator tensors (``_above``/``_below``), masked reductions are products with the float mask, and the loss
gradient is formed in the same pass as the loss (``common.LossWithStoredGradient``), as the fused kernels do.
"""

from __future__ import annotations

import math

import torch

from .common import (
    CLIP_COUNT_MARGIN,
    LOG_RATIO_CLAMP,
    NEG_RATIO_EDGES,
    POS_MINI_RATIO,
    SAFETY_WEIGHT_RANGE,
    WEIGHT_CHANGED_TOLERANCE,
    FIPOResult,
    Hyperparameters,
    needs_gradient,
    ordered_stats,
    token_mean_loss,
)
from .scan import SCAN_BLOCK_SIZE, discounted_reverse_cumsum


# 0/1 float indicators of exact comparisons with a scalar: x - a is 0 only when x == a (IEEE, finite x)
def _above(x: torch.Tensor, a: float) -> torch.Tensor:  # x > a
    return (x - a).clamp_(min=0).sign_()


def _below(x: torch.Tensor, a: float) -> torch.Tensor:  # x < a
    return (a - x).clamp_(min=0).sign_()


def _at_most(x: torch.Tensor, a: float) -> torch.Tensor:  # x <= a
    return 1 - _above(x, a)


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # bool -> float goes through uint8: the direct cast is ~7x slower on CPU
    return (mask.view(torch.uint8) if mask.dtype == torch.bool else mask).to(dtype)


def compute_torch(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  hyperparameters: Hyperparameters, *, with_loss: bool = True,
                  block_size: int = SCAN_BLOCK_SIZE) -> FIPOResult:
    """FIPO (docs/algorithm.md §1) on validated inputs: logps/old_logps (B, T) of one float dtype, advantages (B,) or
    (B, T), mask (B, T) bool. Computes in float64 for float64 inputs, else float32. Unmasked positions must be
    NaN-free with finite advantages (``fipo_trl.loss`` checks); masked ones may hold anything. ``with_loss=False``:
    weights, F, keep and stats only, no loss and no gradient.

    One ``aminmax`` of the log-ratio decides which rare branches can fire at all (a ratio above c = delta, the safety
    threshold, 1 + epsilon_high, 2, or below 1 - epsilon, 1e-3; a log-ratio beyond +-20); the branches that cannot
    are skipped, not approximated. Fresh (B, T) allocations cost page faults on CPU, so temporaries reuse buffers.
    """
    dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32
    h = hyperparameters
    ratio_low, ratio_high = h.ratio_bounds
    dual_clip = h.delta
    needs_grad = needs_gradient(logps, with_loss)
    with torch.no_grad():
        mask_f = _float_mask(mask, dtype)
        adv = torch.nan_to_num(advantages.to(dtype), nan=0.0)  # NaN/inf allowed at padding, zeroed by mask_f below
        adv = adv[:, None] if adv.dim() == 1 else adv * mask_f  # (B, 1) per response, or (B, T)
        negative_adv, positive_adv = _below(adv, 0.0), _above(adv, 0.0)  # 0/1 selectors, (B, 1) or (B, T)

        log_ratio = (logps.detach().to(dtype) - old_logps.to(dtype)).nan_to_num_(nan=0.0).mul_(mask_f)
        log_ratio_min, log_ratio_max = (v.item() for v in log_ratio.aminmax()) if log_ratio.numel() else (0.0, 0.0)
        raw_log_ratio = None
        if max(-log_ratio_min, log_ratio_max) > LOG_RATIO_CLAMP:
            raw_log_ratio, log_ratio = log_ratio, log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            log_ratio_min, log_ratio_max = max(log_ratio_min, -LOG_RATIO_CLAMP), min(log_ratio_max, LOG_RATIO_CLAMP)

        def may_exceed(threshold):  # can a ratio exceed it? (margin: scalar vs vectorised exp rounding)
            return log_ratio_max >= math.log(threshold) - 1e-6

        def may_go_below(threshold):
            return log_ratio_min <= math.log(threshold) + 1e-6

        scratch = torch.empty_like(mask_f)  # one buffer for every temporary indicator
        sum_neg_log_ratio, n_active = -log_ratio.sum(), torch.count_nonzero(log_ratio).to(dtype)
        ratio = torch.exp(log_ratio)  # 1 at masked positions
        if may_exceed(dual_clip):
            participates = _at_most(ratio, dual_clip).mul_(mask_f)  # any advantage sign (the official code)
            future_kl = discounted_reverse_cumsum(log_ratio * participates, h.gamma, block_size)
            n_filtered = (mask_f - participates).sum()
        else:  # no ratio above c: every response token takes part (the log-ratio is already 0 elsewhere)
            future_kl = discounted_reverse_cumsum(log_ratio, h.gamma, block_size)
            n_filtered = mask_f.new_zeros(())

        big = torch.finfo(dtype).max
        outside = mask_f.neg().add_(1).mul_(big)  # added before a min: padded positions never win
        weights = future_kl.exp()  # exp(F), clipped in place below once its sum is taken
        sum_raw_weight = torch.nansum(torch.mul(weights, mask_f, out=scratch))  # inf * 0 at padding is NaN, not data
        lower, upper = h.weight_bounds
        weights = weights.clamp_(max=upper) if h.clip_ratio == 0 else weights.clamp_(lower, upper)
        safety = None
        if may_exceed(h.safety_threshold):
            safety = negative_adv * _above(ratio, h.safety_threshold) * mask_f
            weights = torch.lerp(weights, weights.clamp(*SAFETY_WEIGHT_RANGE), safety)  # lerp: exact at 0 and 1
        masked_weights = weights * mask_f
        weighted_adv = adv * masked_weights  # A f, 0 off the response

        # Dual-clip PPO loss: A > 0: -A f min(r, 1 + eps_high); A < 0: -A f clamp(r, 1 - eps_low, c) (f > 0 is a
        # constant). Equal to the official max/min form token by token; one clamp with per-sign bounds.
        ratio_floor = negative_adv * ratio_low  # 0 for A >= 0: r > 0 always
        ratio_ceiling = negative_adv * (dual_clip - ratio_high) + ratio_high
        # tokens whose A f has the sign of A (f = 0 only after an fp underflow of exp F with clip_ratio = 0)
        signed_tokens = mask_f if lower > 0 or not may_go_below(1.0) else masked_weights.sign()
        if may_exceed(dual_clip):  # A f < 0 and r > c: constant loss; > 1 such token drops the response
            row_dual_clipped = torch.linalg.vecdot(_above(ratio, dual_clip).mul_(negative_adv), signed_tokens)
        else:
            row_dual_clipped = mask_f.new_zeros(mask_f.shape[0])
        keep = row_dual_clipped <= 1
        row_tokens = mask_f.sum(-1)
        n_final = (row_tokens * keep).sum()
        if with_loss:
            capped_ratio = torch.clamp(ratio, min=ratio_floor, max=ratio_ceiling, out=scratch)
            row_loss = -torch.linalg.vecdot(weighted_adv, capped_ratio)
        unscaled_grad = None
        if needs_grad:
            # d loss / d logp = -A f r where floor < r < ceiling (the ratio is not capped) and |log-ratio| <= 20
            unscaled_grad = torch.sub(ratio, ratio_floor).clamp_(min=0).sign_()
            unscaled_grad.mul_(torch.sub(ratio_ceiling, ratio, out=scratch).clamp_(min=0).sign_())
            if raw_log_ratio is not None:
                unscaled_grad.mul_(_at_most(raw_log_ratio.abs(), LOG_RATIO_CLAMP))
            unscaled_grad.mul_(ratio).mul_(weighted_adv).neg_()

        stats = _stats(
            scratch=scratch, outside=outside, mask_f=mask_f, signed_tokens=signed_tokens, row_tokens=row_tokens,
            n_final=n_final, keep=keep, ratio=ratio, negative_adv=negative_adv, positive_adv=positive_adv,
            future_kl=future_kl, weights=weights, masked_weights=masked_weights, safety=safety,
            dual_clipped_rows=row_dual_clipped, lower=lower, upper=upper, ratio_low=ratio_low,
            ratio_high=ratio_high, dual_clip=dual_clip, may_exceed=may_exceed, may_go_below=may_go_below,
            precomputed={"sum_neg_log_ratio": sum_neg_log_ratio, "n_active": n_active, "n_filtered": n_filtered,
                         "sum_raw_weight": sum_raw_weight},
        )
    loss = token_mean_loss(logps, row_loss, keep, n_final, unscaled_grad, dtype) if with_loss else None
    return FIPOResult(weights, weighted_adv.expand_as(weights), future_kl, keep, stats, loss)


def _stats(*, scratch, outside, mask_f, signed_tokens, row_tokens, n_final, keep, ratio, negative_adv, positive_adv,
           future_kl, weights, masked_weights, safety, dual_clipped_rows, lower, upper, ratio_low, ratio_high,
           dual_clip, may_exceed, may_go_below, precomputed) -> dict[str, torch.Tensor]:
    """The stats of ``common.ROW_STATS`` over the batch, computed directly (over response tokens, before the sequence
    filter, as the official metrics).
    Extrema of an empty set are +inf (minima) and -inf (maxima). ``negative_adv``/``positive_adv`` are 0/1
    selectors of shape (B, 1) (per-response advantages) or (B, T). Temporaries go through ``scratch``."""
    dtype = ratio.dtype
    inf = torch.tensor(math.inf, dtype=dtype, device=ratio.device)
    zero = torch.zeros((), dtype=dtype, device=ratio.device)
    empty = ratio.numel() == 0
    per_row = negative_adv.shape[-1] == 1

    def count(indicator, selector=None, tokens=mask_f):  # response tokens where indicator (and selector) is 1
        if selector is None:
            return torch.linalg.vecdot(indicator, tokens).sum()
        if per_row:
            return (torch.linalg.vecdot(indicator, tokens) * selector[:, 0]).sum()
        return torch.linalg.vecdot(indicator.mul_(selector), tokens).sum()

    def indicator(x, op, a):  # 0/1 of x > a, x < a, x >= a or x <= a, written into scratch
        if op in (">", "<="):
            out = torch.sub(x, a, out=scratch).clamp_(min=0).sign_()
        else:
            out = torch.mul(x, -1, out=scratch).add_(a).clamp_(min=0).sign_()
        return out.neg_().add_(1) if op in (">=", "<=") else out

    n_tokens = row_tokens.sum()
    if per_row:
        n_negative, n_positive = (row_tokens * negative_adv[:, 0]).sum(), (row_tokens * positive_adv[:, 0]).sum()
    else:
        n_negative, n_positive = count(negative_adv.clone()), count(positive_adv.clone())

    def extreme(values, selector, reduce, fill):  # over response tokens with selector 1 (ratio > 0 inside)
        if empty:
            return fill
        if fill > 0:  # a min: push everything else up
            shifted = torch.add(values, outside, out=scratch)
            if selector is not None and not per_row:
                shifted.add_((1 - selector) * torch.finfo(dtype).max)
        else:
            shifted = torch.mul(values, mask_f, out=scratch)
            if selector is not None and not per_row:
                shifted.mul_(selector)
        if selector is not None and per_row:
            rows = reduce(shifted, -1) if reduce in (torch.amax, torch.amin) else shifted
            return reduce(torch.where(selector[:, 0] > 0, rows, fill))
        return reduce(shifted)

    if per_row and not empty:  # one row-wise max and min of the ratio serve all three (ratio > 0 on the response)
        row_max = torch.amax(torch.mul(ratio, mask_f, out=scratch), -1)
        row_min = torch.amin(torch.add(ratio, outside, out=scratch), -1)
        negative_rows, positive_rows = negative_adv[:, 0] > 0, positive_adv[:, 0] > 0
        max_neg_ratio = torch.where(n_negative > 0, torch.where(negative_rows, row_max, -inf).amax(), -inf)
        max_pos_ratio = torch.where(n_positive > 0, torch.where(positive_rows, row_max, -inf).amax(), -inf)
        min_pos_ratio = torch.where(n_positive > 0, torch.where(positive_rows, row_min, inf).amin(), inf)
    else:
        max_neg_ratio = torch.where(n_negative > 0, extreme(ratio, negative_adv, torch.amax, -inf), -inf)
        max_pos_ratio = torch.where(n_positive > 0, extreme(ratio, positive_adv, torch.amax, -inf), -inf)
        min_pos_ratio = torch.where(n_positive > 0, extreme(ratio, positive_adv, torch.amin, inf), inf)

    def negative_at_least(a):  # response tokens with A < 0 and ratio >= a
        return count(indicator(ratio, ">=", a), negative_adv) if may_exceed(a) else zero

    n_neg_2, n_neg_3, n_neg_4, n_neg_c = (negative_at_least(a) for a in (*NEG_RATIO_EDGES, dual_clip))
    # PPO clip counted where the clipped term wins: A f > 0 and r > 1 + eps_high, or A f < 0 and r < 1 - eps_low
    pg_clipped = zero
    if may_exceed(ratio_high):
        pg_clipped = pg_clipped + count(indicator(ratio, ">", ratio_high), positive_adv, signed_tokens)
    if may_go_below(ratio_low):
        pg_clipped = pg_clipped + count(indicator(ratio, "<", ratio_low), negative_adv, signed_tokens)
    has_tokens = row_tokens > 0
    any_token = n_tokens > 0
    # exp is monotone: the extrema of exp(F) are exp of the extrema of F (F is finite, exp(F) may overflow)
    min_future_kl = extreme(future_kl, None, torch.amin, inf)
    max_future_kl = torch.sub(future_kl, outside, out=scratch).max() if not empty else -inf
    if safety is None:  # f = clamp(exp F) elementwise, monotone in F: its extrema are those of F, clamped alike
        min_weight, max_weight = (v.exp().clamp(lower, upper) for v in (min_future_kl, max_future_kl))
    else:
        min_weight = extreme(weights, None, torch.amin, inf)
        max_weight = masked_weights.max() if not empty else -inf  # weights >= 0: 0 off the response never wins
    return ordered_stats({
        "n_tokens": n_tokens,
        "n_final_tokens": n_final,
        "sum_neg_log_ratio": precomputed["sum_neg_log_ratio"],
        "sum_future_kl": torch.linalg.vecdot(future_kl, mask_f).sum(),
        "n_active": precomputed["n_active"],
        "n_filtered": precomputed["n_filtered"],
        "n_pg_clipped": pg_clipped,
        "n_dual_clipped": dual_clipped_rows.sum(),
        "n_safety": safety.sum() if safety is not None else zero,
        "sum_weight": masked_weights.sum(),
        "min_weight": torch.where(any_token, min_weight, inf),
        "max_weight": torch.where(any_token, max_weight, -inf),
        "sum_raw_weight": precomputed["sum_raw_weight"],
        "min_raw_weight": torch.where(any_token, min_future_kl.exp(), inf),
        "max_raw_weight": torch.where(any_token, max_future_kl.exp(), -inf) if not empty else -inf,
        "n_upper_clipped": count(indicator(weights, ">=", upper - CLIP_COUNT_MARGIN)),
        "n_lower_clipped": count(indicator(weights, "<=", lower + CLIP_COUNT_MARGIN)),
        "n_weight_changed": (count(indicator(weights, ">", 1 + WEIGHT_CHANGED_TOLERANCE))
                             + count(indicator(weights, "<", 1 - WEIGHT_CHANGED_TOLERANCE))),
        "n_neg_ratio_2_3": n_neg_2 - n_neg_3,
        "n_neg_ratio_3_4": n_neg_3 - n_neg_4,
        "n_neg_ratio_4_c": (n_neg_4 - n_neg_c).clamp(min=0),  # [4, c) is empty when c <= 4
        "n_pos_mini": (count(indicator(ratio, "<", POS_MINI_RATIO), positive_adv) if may_go_below(POS_MINI_RATIO)
                       else zero),
        "max_neg_ratio": max_neg_ratio,
        "max_pos_ratio": max_pos_ratio,
        "min_pos_ratio": min_pos_ratio,
        "n_rows": has_tokens.sum().to(dtype),
        "n_dropped_rows": (has_tokens & ~keep).sum().to(dtype),
    })
