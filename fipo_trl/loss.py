"""Functional FIPO on plain tensors: the official loss, its influence weights and its metrics.

No trainer state lives here. ``fipo_loss`` validates its inputs and dispatches to a compute path in
``fipo_trl.kernels``; the trainer calls the same function, so what it trains with is what is tested here.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import numpy
import torch

from fipo_trl.kernels.fipo_cpu import cpu_kernel_usable, fipo_loss_cpu
from fipo_trl.kernels.fipo_torch import MASKED_MEAN_EPS, fipo_loss_torch, non_finite_error
from fipo_trl.kernels.fipo_triton import fipo_loss_triton, triton_usable

# TRL's loss types; FIPO weights the advantage each of them reads (FIPOTrainer), so all are supported.
SUPPORTED_LOSS_TYPES = ("bnpo", "dapo", "grpo", "dr_grpo", "luspo", "cispo", "sapo", "vespo")
BACKENDS = ("auto", "cpu", "torch", "triton")


@dataclass
class FIPOLossOutput:
    """What ``fipo_loss`` returns.

    loss: scalar, the official token mean over the kept tokens; differentiable w.r.t. ``logps`` only.
    weights: (B, T) detached influence weights f (after the clip and the safety rule).
    weighted_advantages: (B, T) detached A * f, 0 off the response (written by the fused kernels in their pass).
    future_kl: (B, T) detached discounted Future-KL F.
    keep: (B,) bool, False for responses dropped by the sequence filter (> 1 dual-clipped token).
    stats: the sums, counts and extrema the metrics are formed from (what the trainer reduces across ranks).
    backend: the compute path that ran: "triton" (fused kernels, CUDA), "cpu" (fused C kernel) or "torch"
        (blocked-scan torch path).
    metrics (formed from ``stats`` on first access): the official metric names (SPEC §1.2) plus
        ``future_kl_mean``, ``active``, ``filtered_ratio``, ``safety_ratio`` and ``dropped_seq_ratio``; Python
        floats, NaN for an extremum of an empty set.
    """

    loss: torch.Tensor
    weights: torch.Tensor
    future_kl: torch.Tensor
    keep: torch.Tensor
    stats: dict[str, torch.Tensor | float]  # 0-dim tensors, or Python floats from the C kernel
    backend: str
    weighted_advantages: torch.Tensor

    @functools.cached_property
    def metrics(self) -> dict[str, float]:
        return metrics_from_stats(self.stats)


def decay_to_gamma(decay_rate: float) -> float:
    """gamma = 2^(-1/tau): the Future-KL of a token halves every tau tokens (official tau = 32)."""
    return 2.0 ** (-1.0 / decay_rate)


def _as_number(value) -> float | None:
    """A plain float from an int, a float, a numpy scalar or a one-element tensor; None for anything else."""
    if isinstance(value, torch.Tensor):
        return float(value) if value.numel() == 1 and value.dtype != torch.bool else None
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numpy.bool_)):
        return float(value)
    return None


def check_hyperparameters(
    *,
    decay_rate: float,
    clip_ratio: float,
    clip_high_only: bool,
    safety_threshold: float,
    dual_clip: float | None,
    epsilon_low: float,
    epsilon_high: float,
    names: dict[str, str] | None = None,
) -> dict:
    """Raise ValueError naming the offending field and the fix; return the values as plain Python floats and a bool
    (numpy scalars and one-element tensors are accepted). ``names`` maps argument names to the names the caller
    exposes (FIPOConfig passes its field names)."""
    names = names or {}
    given = dict(decay_rate=decay_rate, clip_ratio=clip_ratio, safety_threshold=safety_threshold,
                 dual_clip=dual_clip, epsilon_low=epsilon_low, epsilon_high=epsilon_high)

    def name(arg: str) -> str:
        return names.get(arg, arg)

    def fail(arg: str, value, requirement: str, fix: str):
        raise ValueError(f"`{name(arg)}` = {value!r} is invalid: {requirement}. {fix}")

    values = {}
    for arg, value in given.items():
        if value is None and arg == "dual_clip":
            fail(arg, value, "FIPO needs the dual-clip constant (it also sets the Future-KL ratio filter and the "
                 "sequence filter)", "Use the official 10.0.")
        values[arg] = _as_number(value)
        if values[arg] is None:
            fail(arg, value, f"it must be a number (a float, an int, a numpy scalar or a one-element tensor), got a "
                 f"{type(value).__name__}", "Pass a single number.")
    if isinstance(clip_high_only, torch.Tensor) and clip_high_only.numel() == 1:
        clip_high_only = bool(clip_high_only)
    if not isinstance(clip_high_only, (bool, numpy.bool_)):
        fail("clip_high_only", clip_high_only, "it must be True or False", "Use True (32B recipe) or False (7B).")
    values["clip_high_only"] = bool(clip_high_only)
    decay_rate, clip_ratio, safety_threshold, dual_clip, epsilon_low, epsilon_high = (
        values[arg] for arg in ("decay_rate", "clip_ratio", "safety_threshold", "dual_clip", "epsilon_low",
                                "epsilon_high"))

    if not (math.isfinite(decay_rate) and decay_rate > 0):
        fail("decay_rate", decay_rate, "it must be a finite number > 0 (the Future-KL half-life in tokens)",
             "Use the official 32.0.")
    if not (math.isfinite(clip_ratio) and clip_ratio >= 0):
        fail("clip_ratio", clip_ratio, "it must be a finite number >= 0",
             "Use 0.2 (official), or 0 for the uncapped min(exp F, 10).")
    if not values["clip_high_only"] and clip_ratio >= 1:
        fail("clip_ratio", clip_ratio, f"with `{name('clip_high_only')}`=False the lower bound 1 - clip_ratio must "
             "stay > 0", "Use 0.2 (the 7B recipe's [0.8, 1.2]).")
    if not safety_threshold > 0:  # inf is allowed: it switches the safety rule off
        fail("safety_threshold", safety_threshold, "it must be > 0 (an importance-ratio threshold)",
             "Use 10.0 (32B recipe) or 3.0 (7B recipe).")
    if not 0 <= epsilon_low < 1:
        fail("epsilon_low", epsilon_low, "it must be in [0, 1)", "Use 0.2 (official).")
    if not (math.isfinite(epsilon_high) and epsilon_high >= 0):
        fail("epsilon_high", epsilon_high, "it must be a finite number >= 0", "Use 0.28 (official).")
    if not (math.isfinite(dual_clip) and dual_clip > 1 + epsilon_high):
        fail("dual_clip", dual_clip, f"the dual-clip constant must be finite and > 1 + {name('epsilon_high')} "
             f"({1 + epsilon_high:g}); it also sets the Future-KL ratio filter and the sequence filter",
             "Use the official 10.0.")
    return values


@functools.lru_cache(maxsize=64)  # fipo_loss checks the same values on every micro-batch; errors are not cached
def _validated_once(**hyperparameters) -> tuple:
    return tuple(check_hyperparameters(**hyperparameters).items())


def _checked_hyperparameters(**hyperparameters) -> dict:
    """The hyperparameters validated, as plain floats and a bool (numpy scalars and one-element tensors become
    Python numbers first, so that the cache never keys on a mutable tensor)."""
    plain = {arg: (value.item() if isinstance(value, (torch.Tensor, numpy.generic)) and value.size in (1, ()) else
                   value) for arg, value in hyperparameters.items()}
    try:
        return dict(_validated_once(**plain))
    except TypeError:  # unhashable (a list...): validate uncached, which raises the error naming the argument
        return check_hyperparameters(**plain)


def _check_tensors(logps, old_logps, advantages, mask) -> None:
    for arg, value in (("logps", logps), ("old_logps", old_logps), ("advantages", advantages), ("mask", mask)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"fipo_loss: `{arg}` must be a torch.Tensor, got {type(value).__name__}.")
    if logps.dim() != 2:
        raise ValueError(f"fipo_loss: `logps` must be (B, T), got shape {tuple(logps.shape)}.")
    if not logps.is_floating_point():
        raise TypeError(f"fipo_loss: `logps` must be a floating tensor, got {logps.dtype}.")
    B, T = logps.shape
    for arg, value in (("old_logps", old_logps), ("mask", mask)):
        if value.shape != logps.shape:
            raise ValueError(f"fipo_loss: `{arg}` must have the shape of `logps` {(B, T)}, got {tuple(value.shape)}.")
    if advantages.shape not in ((B,), (B, T)):
        raise ValueError(f"fipo_loss: `advantages` must be (B,) = {(B,)} or (B, T) = {(B, T)}, "
                         f"got {tuple(advantages.shape)}.")
    if old_logps.dtype != logps.dtype:
        raise TypeError(f"fipo_loss: `old_logps` dtype {old_logps.dtype} differs from `logps` dtype {logps.dtype}; "
                        "cast one of them (e.g. `old_logps.to(logps.dtype)`).")
    if not advantages.is_floating_point():
        raise TypeError(f"fipo_loss: `advantages` must be a floating tensor, got {advantages.dtype}.")
    for arg, value in (("old_logps", old_logps), ("advantages", advantages), ("mask", mask)):
        if value.device != logps.device:
            raise ValueError(f"fipo_loss: `{arg}` is on {value.device} but `logps` is on {logps.device}; "
                             "move all inputs to one device.")


def _check_finite(logps, old_logps, advantages, mask) -> None:
    """Non-finite values at masked positions are ignored. At unmasked positions, +-inf log-probs are handled by the
    official +-20 clamp of the log-ratio; a NaN log-ratio or a non-finite advantage would make the loss NaN, so it
    is an error instead."""
    with torch.no_grad():
        # Fast path, one reduction per input: finite sums mean every element is finite, nothing to locate.
        total = logps.sum(dtype=torch.float64) + old_logps.sum(dtype=torch.float64) + advantages.sum(dtype=torch.float64)
        if torch.isfinite(total):
            return
        bad_ratio = mask & torch.isnan(logps - old_logps)
        adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(mask)
        bad_adv = mask & ~torch.isfinite(adv)
        n_ratio, n_adv = int(bad_ratio.sum()), int(bad_adv.sum())
    if n_ratio or n_adv:
        raise non_finite_error(n_ratio, n_adv)


def resolve_backend(backend: str, logps: torch.Tensor) -> str:
    """"auto": the fused Triton kernels for CUDA tensors when Triton is installed, the fused C kernel for CPU tensors
    when it builds, else the torch path. Float64 is the reference dtype and always runs in torch (the fused kernels
    compute in float32)."""
    if backend not in BACKENDS:
        raise ValueError(f"fipo_loss: `backend` = {backend!r} is invalid: use one of {BACKENDS}.")
    if backend != "auto":
        return backend
    if logps.dtype == torch.float64:
        return "torch"
    if logps.is_cuda:
        return "triton" if triton_usable(logps.device) else "torch"
    return "cpu" if logps.device.type == "cpu" and cpu_kernel_usable() else "torch"


def stack_stats(stats: dict[str, float | torch.Tensor]) -> torch.Tensor:
    """The stats as one 1-D tensor in key order (one stack when they are tensors of one dtype, as every path gives)."""
    values = list(stats.values())
    if all(isinstance(v, float) for v in values):
        return torch.tensor(values, dtype=torch.float64)
    if all(isinstance(v, torch.Tensor) and v.dtype == values[0].dtype for v in values):
        return torch.stack(values)
    return torch.stack([torch.as_tensor(v).double() for v in values])


def metrics_from_stats(stats: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """The official metrics (masked means over response tokens, as verl's ``masked_mean``) from summed stats, as
    Python floats (tensors are brought to the host in one transfer); an extremum of an empty set is NaN."""
    if any(isinstance(v, torch.Tensor) for v in stats.values()):
        stats = dict(zip(stats, stack_stats(stats).tolist()))
    n = stats["n_tokens"] + MASKED_MEAN_EPS

    def low(key):
        return math.nan if stats[key] == math.inf else stats[key]

    def high(key):
        return math.nan if stats[key] == -math.inf else stats[key]

    return {
        "ppo_kl": stats["sum_neg_log_ratio"] / n,
        "pg_clipfrac": stats["n_pg_clipped"] / n,
        "pg_clipfrac_lower": stats["n_dual_clipped"] / n,
        "influence_weights_mean": stats["sum_weight"] / n,
        "influence_weights_min": low("min_weight"),
        "influence_weights_max": high("max_weight"),
        "influence_weights_mean_raw": stats["sum_raw_weight"] / n,
        "raw_influence_weights_min": low("min_raw_weight"),
        "raw_influence_weights_max": high("max_raw_weight"),
        "IW_upper_clip_ratio": stats["n_upper_clipped"] / n,
        "IW_lower_clip_ratio": stats["n_lower_clipped"] / n,
        "IW_overall_clip_ratio": (stats["n_upper_clipped"] + stats["n_lower_clipped"]) / n,
        "neg_ratio_2_3": stats["n_neg_ratio_2_3"] / n,
        "neg_ratio_3_4": stats["n_neg_ratio_3_4"] / n,
        "neg_ratio_4_10": stats["n_neg_ratio_4_c"] / n,
        "neg_is_max": high("max_neg_ratio"),
        "pos_is_max": high("max_pos_ratio"),
        "pos_is_min": low("min_pos_ratio"),
        "pos_mini_frac": stats["n_pos_mini"] / n,
        "future_kl_mean": stats["sum_future_kl"] / n,
        "active": stats["n_active"] / n,
        "filtered_ratio": stats["n_filtered"] / n,
        "safety_ratio": stats["n_safety"] / n,
        "dropped_seq_ratio": stats["n_dropped_rows"] / max(stats["n_rows"], 1.0),
    }


def fipo_loss(
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
    backend: str = "auto",
) -> FIPOLossOutput:
    """The official FIPO loss (SPEC §1.1) of one micro-batch.

    Args:
        logps: (B, T) log pi_theta of the sampled tokens; the only input that receives gradient.
        old_logps: (B, T) log pi_old (the policy that generated the batch), same dtype as ``logps``.
        advantages: (B,) per response or (B, T) per token.
        mask: (B, T) response mask (bool or 0/1). Masked positions may hold anything, NaN included.
        decay_rate: tau; gamma = 2^(-1/tau). clip_ratio, clip_high_only: f in [1, 1 + clip_ratio] when
            high-only, else [1 - clip_ratio, 1 + clip_ratio]; clip_ratio = 0 means min(exp F, 10).
        safety_threshold: for A < 0 and ratio > safety_threshold, f is clamped into [0.8, 1].
        dual_clip: c; the dual-clip constant, the Future-KL ratio filter (ratio > c is left out of F) and the
            sequence filter (a response with > 1 token with A < 0 and ratio > c is dropped).
        epsilon_low, epsilon_high: the PPO clip range [1 - epsilon_low, 1 + epsilon_high].
        backend: "auto" (CUDA tensors: the fused Triton kernels when available; CPU tensors: the fused C kernel
            when it builds; otherwise, and for float64, the torch path), "cpu", "torch",
            or "triton" (explicit, for tests and benchmarks; on CPU tensors only under TRITON_INTERPRET=1, else a
            RuntimeError). ``FIPOLossOutput.backend`` says which path ran.

    Float64 inputs are computed in float64, anything else in float32. The log-ratio is clamped to [-20, 20]
    (official), so +-inf log-probs at response tokens give finite values with zero gradient there; a NaN
    log-ratio or a non-finite advantage at a response token raises ValueError rather than return a NaN loss.
    """
    hyperparameters = _checked_hyperparameters(
        decay_rate=decay_rate, clip_ratio=clip_ratio, clip_high_only=clip_high_only, safety_threshold=safety_threshold,
        dual_clip=dual_clip, epsilon_low=epsilon_low, epsilon_high=epsilon_high)
    decay_rate = hyperparameters.pop("decay_rate")
    _check_tensors(logps, old_logps, advantages, mask)
    mask = mask if mask.dtype == torch.bool else mask != 0
    chosen = resolve_backend(backend, logps)
    if chosen != "cpu":  # the C kernel checks finiteness in its own pass
        _check_finite(logps, old_logps, advantages, mask)
    compute = {"cpu": fipo_loss_cpu, "torch": fipo_loss_torch, "triton": fipo_loss_triton}[chosen]
    result = compute(logps, old_logps, advantages, mask, gamma=decay_to_gamma(decay_rate), **hyperparameters)
    if not torch.isfinite(result.loss):  # inputs were checked finite: only huge advantages get here
        largest = advantages.detach().abs().max().item()
        raise ValueError(f"fipo_loss: the loss overflows to {result.loss.item()} although every input is finite: "
                         f"`advantages` are too large (largest |value| = {largest:.3g}; the surrogate multiplies them "
                         "by ratios up to `dual_clip` and weights up to 10). Scale the advantages down; in a trainer, "
                         "scale the rewards down or keep scale_rewards='group', which normalises them.")
    return FIPOLossOutput(
        loss=result.loss, weights=result.weights, future_kl=result.future_kl, keep=result.keep,
        stats=result.stats, backend=chosen, weighted_advantages=result.weighted_advantages,
    )
