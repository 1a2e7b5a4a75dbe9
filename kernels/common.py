"""The contract every compute path shares: hyperparameters, constants, the per-row stats and the result.

- ``Hyperparameters``: the FIPO hyperparameters under TRL's names, with the official defaults (``DEFAULTS``), defined
  here once for the kernels, the functional API (``fipo_trl.loss``) and ``FIPOConfig``.
- ``ROW_STATS``: the one list of per-row statistics, each with the kind that reduces it over rows. The fused paths
  (C and Triton) write one row of these columns per sequence; ``reduce_row_stats`` turns the rows into batch stats.
  The torch path computes the same keys directly. ``fipo_trl.loss.metrics_from_stats`` forms the metrics from them.
- ``FIPOResult``: what every path returns; ``token_mean_loss`` attaches the loss and its stored gradient.

Section numbers refer to docs/algorithm.md.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

LOG_RATIO_CLAMP = 20.0  # §1.1: the log-ratio is clamped to [-20, 20] before anything else
MASKED_MEAN_EPS = 1e-8  # §1.8: verl's masked mean divides by (count + 1e-8); the loss does the same
SAFETY_WEIGHT_RANGE = (0.8, 1.0)  # §1.5: f of a token caught by the safety rule is clamped into this range
UNCAPPED_WEIGHT_MAX = 10.0  # §1.4: with clip_ratio = 0, f = min(exp F, 10)
CLIP_COUNT_MARGIN = 1e-7  # a weight within this of a clip bound counts as clipped (IW_*_clip_ratio, official)
NEG_RATIO_EDGES = (2.0, 3.0, 4.0)  # §1.9: the neg_ratio_2_3 / 3_4 / 4_10 histogram of negative samples
POS_MINI_RATIO = 1e-3  # §1.9: pos_mini_frac counts positive samples with a ratio below this
# A weight further than this from 1 counts as changed (fipo/weight_changed_ratio): FIPO's own activity measure. 1 % of
# the advantage is below what a few updates of noise in the weights move (the toy runs' f stays within ~1 % of 1).
WEIGHT_CHANGED_TOLERANCE = 0.01


class Hyperparameters(NamedTuple):
    """The FIPO hyperparameters, named as in TRL's GRPOConfig; the defaults are the official 32B recipe (§1).

    FIPOConfig spells the FIPO-specific ones with a ``fipo_`` prefix (``fipo_decay_rate``); ``delta``, ``epsilon``
    and ``epsilon_high`` are GRPOConfig's own fields.
    """

    decay_rate: float = 32.0  # tau: gamma = 2^(-1/tau)
    clip_ratio: float = 0.2  # f in [1, 1 + clip_ratio] (high only) or [1 - clip_ratio, 1 + clip_ratio]; 0: uncapped
    clip_high_only: bool = True
    safety_threshold: float = 10.0  # A < 0 and ratio above it: f clamped into SAFETY_WEIGHT_RANGE
    delta: float = 10.0  # the dual-clip constant c, also the Future-KL ratio filter and the sequence filter
    epsilon: float = 0.2  # PPO clip range [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float = 0.28

    @property
    def gamma(self) -> float:
        return decay_to_gamma(self.decay_rate)

    @property
    def weight_bounds(self) -> tuple[float, float]:
        return weight_bounds(self.clip_ratio, self.clip_high_only)

    @property
    def ratio_bounds(self) -> tuple[float, float]:
        return 1.0 - self.epsilon, 1.0 + self.epsilon_high

    @property
    def clipped_at(self) -> tuple[float, float]:
        """A weight at or below the first, or at or above the second, counts as clipped (n_lower/upper_clipped)."""
        lower, upper = self.weight_bounds
        return lower + CLIP_COUNT_MARGIN, upper - CLIP_COUNT_MARGIN


DEFAULTS = Hyperparameters()


def decay_to_gamma(decay_rate: float) -> float:
    """gamma = 2^(-1/tau): a future token's log-ratio counts half after tau tokens (§1.3)."""
    return 2.0 ** (-1.0 / decay_rate)


def weight_bounds(clip_ratio: float, clip_high_only: bool) -> tuple[float, float]:
    """(lower, upper) clip bounds of f (§1.4); clip_ratio == 0 means min(exp F, 10) with no lower bound."""
    if clip_ratio == 0:
        return 0.0, UNCAPPED_WEIGHT_MAX
    return (1.0 if clip_high_only else 1.0 - clip_ratio), 1.0 + clip_ratio


# --- per-row stats --------------------------------------------------------------------------------------------------

SUM, MIN, MAX = "sum", "min", "max"

# Over a row's response tokens, before the sequence filter (as the official metrics). A min/max column's name starts
# with min_/max_ (FIPOTrainer reduces the stats across processes by that prefix; checked below).
ROW_STATS: tuple[tuple[str, str], ...] = (
    ("n_tokens", SUM),  # response tokens
    ("n_final_tokens", SUM),  # response tokens of a row the sequence filter keeps (the loss denominator)
    ("sum_neg_log_ratio", SUM),  # -sum of the clamped log-ratio (ppo_kl)
    ("sum_future_kl", SUM),
    ("n_active", SUM),  # tokens with a non-zero log-ratio
    ("n_filtered", SUM),  # tokens left out of F (ratio > delta)
    ("n_pg_clipped", SUM),  # PPO clip wins: A f > 0 and r > 1 + epsilon_high, or A f < 0 and r < 1 - epsilon
    ("n_dual_clipped", SUM),  # A f < 0 and r > delta
    ("n_safety", SUM),  # tokens caught by the safety rule
    ("sum_weight", SUM),
    ("min_weight", MIN),
    ("max_weight", MAX),
    ("sum_raw_weight", SUM),  # exp(F) before the clip
    ("min_raw_weight", MIN),
    ("max_raw_weight", MAX),
    ("n_upper_clipped", SUM),  # f within CLIP_COUNT_MARGIN of the upper bound
    ("n_lower_clipped", SUM),
    ("n_weight_changed", SUM),  # |f - 1| > WEIGHT_CHANGED_TOLERANCE
    ("n_neg_ratio_2_3", SUM),  # A < 0 and ratio in [2, 3)
    ("n_neg_ratio_3_4", SUM),
    ("n_neg_ratio_4_c", SUM),  # [4, delta)
    ("n_pos_mini", SUM),  # A > 0 and ratio < POS_MINI_RATIO
    ("max_neg_ratio", MAX),
    ("max_pos_ratio", MAX),
    ("min_pos_ratio", MIN),
    ("n_rows", SUM),  # 1 for a row with response tokens
    ("n_dropped_rows", SUM),  # 1 for such a row that the sequence filter drops
)
STAT_NAMES = tuple(name for name, _ in ROW_STATS)
COLUMN = {name: index for index, name in enumerate(STAT_NAMES)}
N_STATS = len(ROW_STATS)
IDENTITY = {SUM: 0.0, MIN: math.inf, MAX: -math.inf}  # what an empty set reduces to
assert all(kind == (name[:3] if name.startswith(("min_", "max_")) else SUM) for name, kind in ROW_STATS)


@functools.lru_cache(maxsize=8)
def _kind_masks(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    kinds = [kind for _, kind in ROW_STATS]
    return (torch.tensor([kind == MIN for kind in kinds], device=device),
            torch.tensor([kind == MAX for kind in kinds], device=device))


def reduce_row_stats(rows: torch.Tensor) -> torch.Tensor:
    """(B, N_STATS) per-row stats -> (N_STATS,) batch stats: each column summed, minimised or maximised by its kind."""
    if rows.shape[0] == 0:
        return torch.tensor([IDENTITY[kind] for _, kind in ROW_STATS], dtype=rows.dtype, device=rows.device)
    is_min, is_max = _kind_masks(rows.device)
    return torch.where(is_min, rows.amin(0), torch.where(is_max, rows.amax(0), rows.sum(0)))


def ordered_stats(values: dict) -> dict:
    """The torch path's directly computed stats, in ROW_STATS order; exactly those keys or a KeyError."""
    if values.keys() != set(STAT_NAMES):
        raise KeyError(f"stats differ from ROW_STATS: {sorted(set(values) ^ set(STAT_NAMES))}")
    return {name: values[name] for name in STAT_NAMES}


# --- the result -----------------------------------------------------------------------------------------------------


class FIPOResult(NamedTuple):
    weights: torch.Tensor  # (B, T) detached influence weights f, after the clip and the safety rule
    weighted_advantages: torch.Tensor  # (B, T) detached A * f, 0 off the response (what the trainer trains with)
    future_kl: torch.Tensor  # (B, T) detached F
    keep: torch.Tensor  # (B,) bool, False for a sequence dropped by the sequence filter
    stats: dict[str, torch.Tensor | float]  # ROW_STATS reduced over the batch: 0-dim tensors, or Python floats
    # where they are on the host already (the C kernel)
    loss: torch.Tensor | None  # the official loss, differentiable w.r.t. logps; None when only weights were asked for


def non_finite_error(n_nan_log_ratio: int, n_bad_advantage: int) -> ValueError:
    """The error for response tokens whose inputs would make the loss NaN."""
    if n_nan_log_ratio:
        return ValueError(f"fipo_trl: {n_nan_log_ratio} unmasked token(s) have a NaN log-ratio (`logps` or "
                          "`old_logps` is NaN there, or both are the same infinity). Mask those tokens out or fix "
                          "the log-probs.")
    return ValueError(f"fipo_trl: {n_bad_advantage} unmasked token(s) have a non-finite advantage. "
                      "Replace NaN/inf advantages (e.g. with 0) or mask those tokens out.")


class LossWithStoredGradient(torch.autograd.Function):
    """Attach a precomputed d loss / d logps to a loss value: the backward scales it per row, nothing else."""

    @staticmethod
    def forward(ctx, logps, loss, unscaled_grad, row_scale):
        ctx.save_for_backward(unscaled_grad, row_scale)
        ctx.logps_dtype = logps.dtype
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        unscaled_grad, row_scale = ctx.saved_tensors
        return (unscaled_grad * (grad_loss * row_scale)[:, None]).to(ctx.logps_dtype), None, None, None


def token_mean_loss(logps, row_loss, keep, n_final_tokens, unscaled_grad, dtype) -> torch.Tensor:
    """The official loss (§1.7-1.8): the kept rows' loss sums over (kept tokens + 1e-8), as ``dtype``; with
    ``unscaled_grad`` (the per-token d loss / d logp before that scale) it carries the gradient w.r.t. ``logps``."""
    denominator = n_final_tokens + MASKED_MEAN_EPS
    loss = ((row_loss * keep).sum() / denominator).to(dtype)
    if unscaled_grad is None:
        return loss
    return LossWithStoredGradient.apply(logps, loss, unscaled_grad, keep.to(unscaled_grad.dtype) / denominator)


def result_from_rows(logps, *, weights, weighted_advantages, future_kl, keep, row_stats, row_loss, unscaled_grad,
                     stats_on_host: bool) -> FIPOResult:
    """A fused path's result from what its kernel wrote: (B, N_STATS) row stats, the rows' loss sums (None for
    weights only) and the unscaled gradient (None without one)."""
    batch = reduce_row_stats(row_stats)
    stats = dict(zip(STAT_NAMES, batch.tolist() if stats_on_host else batch.unbind(0)))
    loss = None
    if row_loss is not None:
        loss = token_mean_loss(logps, row_loss, keep, stats["n_final_tokens"], unscaled_grad, weights.dtype)
    return FIPOResult(weights, weighted_advantages, future_kl, keep, stats, loss)


def needs_gradient(logps: torch.Tensor, with_loss: bool) -> bool:
    return with_loss and torch.is_grad_enabled() and logps.requires_grad
