"""The official FIPO algorithm, written out step by step (docs/algorithm.md §1): the test oracle and the benchmark's
baseline. Never used for training.

Every step reads the way the official ``compute_policy_loss_future_kl`` does (``_official_steps``). The Future-KL
comes two ways:

- ``discounted_reverse_cumsum_naive``: the plain sequential recursion F_t = x_t + gamma * F_{t+1};
- ``future_kl_chunked``: the official evaluation, 128 columns of an explicit decay matrix at a time.

``fipo_loss_naive`` runs the steps in float64 with the sequential recursion and returns every intermediate, the
gradient and the batch stats of ``common.ROW_STATS``: every compute path is tested directly against it.
``official_fipo_loss`` runs them as the official code does (input dtype, chunked F on a log-ratio that still carries
autograd): what ``benchmarks/bench_fipo_loss.py`` times. Hyperparameters are keyword arguments named as the fields of
``common.Hyperparameters`` (TRL's names), with the official defaults.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import (
    CLIP_COUNT_MARGIN,
    LOG_RATIO_CLAMP,
    MASKED_MEAN_EPS,
    NEG_RATIO_EDGES,
    POS_MINI_RATIO,
    SAFETY_WEIGHT_RANGE,
    WEIGHT_CHANGED_TOLERANCE,
    Hyperparameters,
    ordered_stats,
)


def discounted_reverse_cumsum_naive(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """y[..., t] = sum_{j >= t} gamma^(j - t) x[..., j], by the sequential recursion, in float64."""
    x = x.double()
    y = torch.empty_like(x)
    running = torch.zeros(x.shape[:-1], dtype=torch.float64, device=x.device)
    for t in range(x.shape[-1] - 1, -1, -1):
        running = x[..., t] + gamma * running
        y[..., t] = running
    return y


def future_kl_chunked(x: torch.Tensor, gamma: float, chunk: int = 128) -> torch.Tensor:
    """The same sum as the official code evaluates it (§1.3): for each block of ``chunk`` columns j, a decay matrix
    gamma^(j - i) over every earlier position i, multiplied in. Keeps T x chunk buffers; differentiable in x."""
    T = x.shape[-1]
    positions = torch.arange(T, device=x.device)
    future_kl = torch.zeros_like(x)
    for start in range(0, T, chunk):
        columns = positions[start:start + chunk]
        distance = (columns[None, :] - positions[:start + chunk, None]).to(x.dtype)
        decay = torch.where(distance >= 0, gamma ** distance.clamp(min=0), torch.zeros_like(distance))
        future_kl = future_kl + F.pad(x[:, start:start + chunk] @ decay.T, (0, T - start - len(columns)))
    return future_kl


def dual_clip_surrogate(weighted_adv: torch.Tensor, ratio: torch.Tensor, h: Hyperparameters):
    """§1.6: the per-token dual-clip PPO loss on A * f, which tokens the dual clip caps (§1.7), and where the PPO
    clip wins (pg_clipfrac)."""
    loss1 = -weighted_adv * ratio
    loss2 = -weighted_adv * ratio.clamp(*h.ratio_bounds)
    clip_loss = torch.maximum(loss1, loss2)
    loss3 = -weighted_adv * h.delta
    per_token_loss = torch.where(weighted_adv < 0, torch.minimum(loss3, clip_loss), clip_loss)
    dual_clipped = (weighted_adv < 0) & (clip_loss > loss3)
    return per_token_loss, dual_clipped, loss2 > loss1


def _official_steps(logps, old_logps, advantages, mask, h: Hyperparameters, future_kl_of, detach_log_ratio):
    """§1.1-1.8 on (B, T) tensors of one dtype; returns every intermediate by name."""
    B, T = logps.shape
    on = mask > 0
    mask = on.to(logps.dtype)
    adv = (advantages[:, None] if advantages.dim() == 1 else advantages).expand(B, T)
    adv = torch.where(on, adv, 0.0)  # padded positions hold A = 0

    # 1. signed log-ratio, clamped before both exp and the Future-KL sum
    log_ratio = torch.where(on, (logps - old_logps).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), 0.0)
    ratio = torch.exp(log_ratio)
    # 2. participation filter: response tokens whose ratio does not exceed the dual-clip constant, any sign of A
    participates = mask * (ratio <= h.delta)
    # 3. F: discounted sum over absolute positions (holes still advance the exponent)
    future_kl = future_kl_of((log_ratio.detach() if detach_log_ratio else log_ratio) * participates, h.gamma)
    # 4. influence weight, detached
    w_raw = torch.exp(future_kl)
    lower, upper = h.weight_bounds
    w_clipped = w_raw.clamp(max=upper) if h.clip_ratio == 0 else w_raw.clamp(lower, upper)
    # 5. safety rule, after the clip: negative advantage and a PPO ratio above the threshold
    safety_hit = (adv < 0) & (ratio > h.safety_threshold)
    w = torch.where(safety_hit, w_clipped.clamp(*SAFETY_WEIGHT_RANGE), w_clipped).detach()
    # 6. dual-clip PPO surrogate on the weighted advantage
    weighted_adv = adv * w
    per_token_loss, dual_clipped, pg_clipped = dual_clip_surrogate(weighted_adv, ratio, h)
    # 7. sequence filter: drop a response with more than one dual-clipped token
    dual_clipped = dual_clipped & on
    n_dual_clipped = dual_clipped.to(logps.dtype).sum(-1)
    seq_valid = (n_dual_clipped <= 1).to(logps.dtype)
    final_mask = mask * seq_valid[:, None]
    # 8. token mean over the kept tokens
    loss = (per_token_loss * final_mask).sum() / (final_mask.sum() + MASKED_MEAN_EPS)
    return {
        "mask": mask, "adv": adv, "log_ratio": log_ratio, "ratio": ratio, "participates": participates,
        "future_kl": future_kl, "w_raw": w_raw, "w_clipped": w_clipped, "safety_hit": safety_hit, "w": w,
        "weighted_advantages": weighted_adv, "per_token_loss": per_token_loss, "dual_clipped": dual_clipped,
        "pg_clipped": pg_clipped, "n_dual_clipped": n_dual_clipped, "seq_valid": seq_valid,
        "final_mask": final_mask, "loss": loss,
    }


def official_fipo_loss(logps, old_logps, advantages, mask, *, chunk: int = 128, detach_log_ratio: bool = False,
                       **hyperparameters) -> torch.Tensor:
    """The official loss as the official code computes it: in the inputs' dtype, F by chunked decay-matrix products
    on a log-ratio that carries autograd (unless ``detach_log_ratio``); differentiable w.r.t. ``logps``."""
    steps = _official_steps(logps, old_logps, advantages, mask, Hyperparameters(**hyperparameters),
                            lambda x, gamma: future_kl_chunked(x, gamma, chunk), detach_log_ratio)
    return steps["loss"]


def fipo_loss_naive(logps, old_logps, advantages, mask, **hyperparameters) -> dict[str, torch.Tensor]:
    """Every intermediate of the official loss in float64, without autograd: the loss value, its gradient w.r.t.
    logps (``grad_logp``, written out) and the batch stats of ``common.ROW_STATS`` (``stats``, Python floats)."""
    h = Hyperparameters(**hyperparameters)
    logps, old_logps, advantages, mask = (t.detach().double() for t in (logps, old_logps, advantages, mask))
    s = _official_steps(logps, old_logps, advantages, mask, h, discounted_reverse_cumsum_naive, False)
    # the gradient of the loss w.r.t. logps: only the ratio carries gradient, d ratio / d logp = ratio
    ratio, weighted_adv = s["ratio"], s["weighted_advantages"]
    ratio_low, ratio_high = h.ratio_bounds
    ratio_is_live = torch.where(weighted_adv >= 0, ratio < ratio_high, (ratio > ratio_low) & (ratio < h.delta))
    clamp_is_live = ((logps - old_logps).abs() <= LOG_RATIO_CLAMP) & (s["mask"] > 0)
    final_mask = s["final_mask"]
    s["grad_logp"] = -weighted_adv * ratio * ratio_is_live * clamp_is_live * final_mask / (final_mask.sum() + 1e-8)
    s["safety_hit"] = s["safety_hit"].double()
    s["stats"] = _reference_stats(s, h)
    return s


def _reference_stats(s: dict[str, torch.Tensor], h: Hyperparameters) -> dict[str, float]:
    """ROW_STATS over the batch from the float64 intermediates, each by its definition (common.py)."""
    on, ratio, w, w_raw = s["mask"] > 0, s["ratio"], s["w"], s["w_raw"]
    negative, positive = on & (s["adv"] < 0), on & (s["adv"] > 0)
    lower, upper = h.weight_bounds
    two, three, four = NEG_RATIO_EDGES
    has_tokens, kept = on.any(-1), s["seq_valid"] > 0

    def count(selected):
        return float(selected.sum())

    def total(values):
        return float(values[on].sum())

    def lowest(values, where=on):
        return float(values[where].min()) if where.any() else math.inf

    def highest(values, where=on):
        return float(values[where].max()) if where.any() else -math.inf

    return ordered_stats({
        "n_tokens": count(on),
        "n_final_tokens": count(s["final_mask"]),
        "sum_neg_log_ratio": -total(s["log_ratio"]),
        "sum_future_kl": total(s["future_kl"]),
        "n_active": count(on & (s["log_ratio"] != 0)),
        "n_filtered": count(on & (s["participates"] == 0)),
        "n_pg_clipped": count(on & s["pg_clipped"]),
        "n_dual_clipped": count(s["dual_clipped"]),
        "n_safety": count(on & s["safety_hit"].bool()),
        "sum_weight": total(w),
        "min_weight": lowest(w),
        "max_weight": highest(w),
        "sum_raw_weight": total(w_raw),
        "min_raw_weight": lowest(w_raw),
        "max_raw_weight": highest(w_raw),
        "n_upper_clipped": count(on & (w >= upper - CLIP_COUNT_MARGIN)),
        "n_lower_clipped": count(on & (w <= lower + CLIP_COUNT_MARGIN)),
        "n_weight_changed": count(on & ((w - 1).abs() > WEIGHT_CHANGED_TOLERANCE)),
        "n_neg_ratio_2_3": count(negative & (ratio >= two) & (ratio < three)),
        "n_neg_ratio_3_4": count(negative & (ratio >= three) & (ratio < four)),
        "n_neg_ratio_4_c": count(negative & (ratio >= four) & (ratio < h.delta)),
        "n_pos_mini": count(positive & (ratio < POS_MINI_RATIO)),
        "max_neg_ratio": highest(ratio, negative),
        "max_pos_ratio": highest(ratio, positive),
        "min_pos_ratio": lowest(ratio, positive),
        "n_rows": count(has_tokens),
        "n_dropped_rows": count(has_tokens & ~kept),
    })


__all__ = ["discounted_reverse_cumsum_naive", "dual_clip_surrogate", "fipo_loss_naive", "future_kl_chunked",
           "official_fipo_loss"]
