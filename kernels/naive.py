"""Slow, obviously-correct float64 reference of the official FIPO loss (SPEC §1.1).

Every step is written out the way the official ``compute_policy_loss_future_kl`` reads, with a plain
sequential recursion for the Future-KL. It is documentation first and a test oracle second: the fast
paths (``fipo_torch.py`` and the Triton kernels) are checked against it. Never used for training.
"""

from __future__ import annotations

import torch


def fipo_loss_naive(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    decay_rate: float = 32.0,
    clip_ratio: float = 0.2,
    clip_high_only: bool = True,
    safety_threshold: float = 10.0,
    dual_clip: float = 10.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
) -> dict[str, torch.Tensor]:
    """All intermediates of the official loss, in float64, without autograd (the loss is a value only)."""
    logps, old_logps, mask = (t.detach().double() for t in (logps, old_logps, mask))
    B, T = logps.shape
    adv = advantages.detach().double()
    adv = (adv[:, None] if adv.dim() == 1 else adv).expand(B, T) * mask  # padded positions hold A = 0

    # 1. signed log-ratio, clamped before both exp and the Future-KL sum
    log_ratio = torch.where(mask > 0, (logps - old_logps).clamp(-20.0, 20.0), torch.zeros_like(logps))
    ratio = torch.exp(log_ratio)
    # 2. participation filter: response tokens whose ratio does not exceed the dual-clip constant, any sign of A
    participates = mask * (ratio <= dual_clip).double()
    x = log_ratio * participates
    # 3. F_t = x_t + gamma * F_{t+1}: discounted sum over absolute positions (holes still advance the exponent)
    gamma = 2.0 ** (-1.0 / decay_rate)
    future_kl = torch.zeros_like(x)
    running = torch.zeros(B, dtype=torch.float64)
    for t in range(T - 1, -1, -1):
        running = x[:, t] + gamma * running
        future_kl[:, t] = running
    # 4. influence weight
    w_raw = torch.exp(future_kl)
    if clip_ratio != 0:
        lower = 1.0 if clip_high_only else 1.0 - clip_ratio
        upper = 1.0 + clip_ratio
        w_clipped = w_raw.clamp(lower, upper)
    else:
        lower, upper = 0.0, 10.0
        w_clipped = w_raw.clamp(max=10.0)
    # 5. safety rule, after the clip: negative advantage and a PPO ratio above the threshold
    safety_hit = (adv < 0) & (ratio > safety_threshold)
    w = torch.where(safety_hit, w_clipped.clamp(0.8, 1.0), w_clipped)
    # 6. dual-clip PPO surrogate on the weighted advantage
    weighted_adv = adv * w
    loss1 = -weighted_adv * ratio
    loss2 = -weighted_adv * ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    clip_loss = torch.maximum(loss1, loss2)
    loss3 = -weighted_adv * dual_clip
    per_token_loss = torch.where(weighted_adv < 0, torch.minimum(loss3, clip_loss), clip_loss)
    # 7. sequence filter: drop a response with more than one dual-clipped token
    dual_clipped = (weighted_adv < 0) & (clip_loss > loss3) & (mask > 0)
    n_dual_clipped = dual_clipped.double().sum(-1)
    seq_valid = (n_dual_clipped <= 1).double()
    final_mask = mask * seq_valid[:, None]
    # 8. token mean over the kept tokens
    loss = (per_token_loss * final_mask).sum() / (final_mask.sum() + 1e-8)
    # gradient of the loss w.r.t. logps: only the ratio carries gradient, d ratio / d logp = ratio
    ratio_is_live = torch.where(
        weighted_adv >= 0, ratio < 1.0 + epsilon_high, (ratio > 1.0 - epsilon_low) & (ratio < dual_clip)
    )
    clamp_is_live = ((logps - old_logps).abs() <= 20.0) & (mask > 0)
    grad_logp = -weighted_adv * ratio * ratio_is_live * clamp_is_live * final_mask / (final_mask.sum() + 1e-8)
    return {
        "gamma": torch.tensor(gamma, dtype=torch.float64),
        "lower": torch.tensor(lower, dtype=torch.float64),
        "upper": torch.tensor(upper, dtype=torch.float64),
        "log_ratio": log_ratio,
        "ratio": ratio,
        "participates": participates,
        "future_kl": future_kl,
        "w_raw": w_raw,
        "w_clipped": w_clipped,
        "safety_hit": safety_hit.double(),
        "w": w,
        "per_token_loss": per_token_loss,
        "n_dual_clipped": n_dual_clipped,
        "seq_valid": seq_valid,
        "final_mask": final_mask,
        "loss": loss,
        "grad_logp": grad_logp,
    }


def discounted_reverse_cumsum_naive(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """y[..., t] = sum_{j >= t} gamma^(j - t) x[..., j], by the sequential recursion, in float64."""
    x = x.double()
    y = torch.empty_like(x)
    running = torch.zeros(x.shape[:-1], dtype=torch.float64)
    for t in range(x.shape[-1] - 1, -1, -1):
        running = x[..., t] + gamma * running
        y[..., t] = running
    return y


__all__ = ["fipo_loss_naive", "discounted_reverse_cumsum_naive"]
