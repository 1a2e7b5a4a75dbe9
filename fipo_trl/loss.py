"""Functional FIPO on plain tensors: the influence weights (``fipo_weights``), the official loss (``fipo_loss``)
and the metrics.

No trainer state lives here. Both functions validate their inputs and dispatch to a compute path in
``fipo_trl.kernels``; the trainer calls ``fipo_weights``, so what it trains with is what is tested here. Keyword
arguments are TRL's names (FIPOConfig adds a ``fipo_`` prefix to the FIPO-specific ones); the defaults are the
official 32B recipe (``fipo_trl.kernels.common.DEFAULTS``). Section numbers refer to docs/algorithm.md.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from dataclasses import dataclass

import numpy
import torch

from fipo_trl.kernels import c_kernel_usable, compute_c, compute_torch, compute_triton, triton_usable
from fipo_trl.kernels.common import (
    DEFAULTS,
    MASKED_MEAN_EPS,
    STAT_NAMES,
    Hyperparameters,
    non_finite_error,
    reduce_row_stats,
)

# TRL's loss types; FIPO weights the advantage each of them reads (FIPOTrainer), so all are supported.
SUPPORTED_LOSS_TYPES = ("bnpo", "dapo", "grpo", "dr_grpo", "luspo", "cispo", "sapo", "vespo")
BACKENDS = ("auto", "c", "torch", "triton")
COMPUTE_PATHS = {"c": compute_c, "torch": compute_torch, "triton": compute_triton}
DEPRECATED_BACKENDS = {"cpu": "c"}  # 0.1.0's name of the C kernel; accepted with a warning until 0.3.0
# The hyperparameters FIPOConfig spells with a ``fipo_`` prefix; the others are GRPOConfig's own fields.
FIPO_SPECIFIC = ("decay_rate", "clip_ratio", "clip_high_only", "safety_threshold")


@dataclass
class FIPOWeights:
    """What ``fipo_weights`` returns (everything detached).

    weights: (B, T) influence weights f (after the clip and the safety rule).
    weighted_advantages: (B, T) A * f, 0 off the response (written by the fused kernels in their pass).
    future_kl: (B, T) the discounted Future-KL F.
    keep: (B,) bool, False for responses dropped by the sequence filter (> 1 dual-clipped token).
    stats: the sums, counts and extrema the metrics are formed from (``fipo_trl.kernels.common.ROW_STATS``; what
        the trainer reduces across ranks): 0-dim tensors, or Python floats from the C kernel.
    backend: the compute path that ran: "triton" (fused kernel, CUDA), "c" (fused C kernel) or "torch".
    metrics (formed from ``stats`` on first access): the official metric names (§1.9) plus ``future_kl_mean``,
        ``active``, ``filtered_ratio``, ``safety_ratio`` and ``dropped_seq_ratio``; Python floats, NaN for an
        extremum of an empty set.
    """

    weights: torch.Tensor
    weighted_advantages: torch.Tensor
    future_kl: torch.Tensor
    keep: torch.Tensor
    stats: dict[str, torch.Tensor | float]
    backend: str

    @functools.cached_property
    def metrics(self) -> dict[str, float]:
        return metrics_from_stats(self.stats)


@dataclass
class FIPOLossOutput(FIPOWeights):
    """What ``fipo_loss`` returns: ``FIPOWeights`` plus ``loss``, the official token mean over the kept tokens, a
    scalar differentiable w.r.t. ``logps`` only."""

    loss: torch.Tensor


def config_field(name: str) -> str:
    """The FIPOConfig field of a functional argument: FIPO-specific ones carry the ``fipo_`` prefix."""
    return f"fipo_{name}" if name in FIPO_SPECIFIC else name


def hyperparameters_from_config(args) -> dict:
    """The functional API's keyword arguments from a FIPOConfig (``epsilon_high`` None means ``epsilon``, as TRL)."""
    values = {name: getattr(args, config_field(name)) for name in Hyperparameters._fields}
    if values["epsilon_high"] is None:
        values["epsilon_high"] = values["epsilon"]
    return values


def _as_number(value) -> float | None:
    """A plain float from an int, a float, a numpy scalar or a one-element tensor; None for anything else."""
    if isinstance(value, torch.Tensor):  # a meta tensor has no value to read
        return float(value) if value.numel() == 1 and value.dtype != torch.bool and not value.is_meta else None
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numpy.bool_)):
        return float(value)
    return None


def check_hyperparameters(*, decay_rate, clip_ratio, clip_high_only, safety_threshold, delta, epsilon, epsilon_high,
                          prefix: str = "") -> Hyperparameters:
    """Raise ValueError naming the offending argument and the fix; return the values as plain Python floats and a
    bool (numpy scalars and one-element tensors are accepted). ``prefix`` is put before the FIPO-specific names in
    the errors (FIPOConfig passes "fipo_", so that they name its fields)."""
    given = dict(decay_rate=decay_rate, clip_ratio=clip_ratio, safety_threshold=safety_threshold, delta=delta,
                 epsilon=epsilon, epsilon_high=epsilon_high)

    def name(arg: str) -> str:
        return prefix + arg if arg in FIPO_SPECIFIC else arg

    def fail(arg: str, value, requirement: str, fix: str):
        raise ValueError(f"`{name(arg)}` = {value!r} is invalid: {requirement}. {fix}")

    values = {}
    for arg, value in given.items():
        if value is None and arg == "delta":
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
    h = Hyperparameters(**values, clip_high_only=bool(clip_high_only))

    if not (math.isfinite(h.decay_rate) and h.decay_rate > 0):
        fail("decay_rate", h.decay_rate, "it must be a finite number > 0 (the Future-KL half-life in tokens)",
             "Use the official 32.0.")
    if not (math.isfinite(h.clip_ratio) and h.clip_ratio >= 0):
        fail("clip_ratio", h.clip_ratio, "it must be a finite number >= 0",
             "Use 0.2 (official), or 0 for the uncapped min(exp F, 10).")
    if not h.clip_high_only and h.clip_ratio >= 1:
        fail("clip_ratio", h.clip_ratio, f"with `{name('clip_high_only')}`=False the lower bound 1 - clip_ratio must "
             "stay > 0", "Use 0.2 (the 7B recipe's [0.8, 1.2]).")
    if not h.safety_threshold > 0:  # inf is allowed: it switches the safety rule off
        fail("safety_threshold", h.safety_threshold, "it must be > 0 (an importance-ratio threshold)",
             "Use 10.0 (32B recipe) or 3.0 (7B recipe).")
    if not 0 <= h.epsilon < 1:
        fail("epsilon", h.epsilon, "it must be in [0, 1)", "Use 0.2 (official).")
    if not (math.isfinite(h.epsilon_high) and h.epsilon_high >= 0):
        fail("epsilon_high", h.epsilon_high, "it must be a finite number >= 0", "Use 0.28 (official).")
    if not (math.isfinite(h.delta) and h.delta > 1 + h.epsilon_high):
        fail("delta", h.delta, f"the dual-clip constant must be finite and > 1 + {name('epsilon_high')} "
             f"({1 + h.epsilon_high:g}); it also sets the Future-KL ratio filter and the sequence filter",
             "Use the official 10.0.")
    return h


@functools.lru_cache(maxsize=64)  # checked on every micro-batch with the same values; errors are not cached
def _validated_once(**hyperparameters) -> Hyperparameters:
    return check_hyperparameters(**hyperparameters)


def _plain(value):
    """A one-element tensor (meta excepted: it holds no value) or a numpy scalar as a Python number; else as is."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 and not value.is_meta else value
    return value.item() if isinstance(value, numpy.generic) else value


def _checked_hyperparameters(**hyperparameters) -> Hyperparameters:
    """The hyperparameters validated, as plain floats and a bool (numpy scalars and one-element tensors become
    Python numbers first, so that the cache never keys on a mutable tensor)."""
    plain = {arg: _plain(value) for arg, value in hyperparameters.items()}
    try:
        return _validated_once(**plain)
    except TypeError:  # unhashable (a list...): validate uncached, which raises the error naming the argument
        return check_hyperparameters(**plain)


def _check_tensors(logps, old_logps, advantages, mask, caller: str) -> None:
    for arg, value in (("logps", logps), ("old_logps", old_logps), ("advantages", advantages), ("mask", mask)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{caller}: `{arg}` must be a torch.Tensor, got {type(value).__name__}.")
        if value.is_meta:
            raise ValueError(f"{caller}: `{arg}` is a meta tensor (a shape and a dtype, no values), so nothing can be "
                             "computed from it. Fix: pass tensors that hold data (materialise the model's weights "
                             "before computing log-probs).")
    if logps.dim() != 2:
        raise ValueError(f"{caller}: `logps` must be (B, T), got shape {tuple(logps.shape)}.")
    if not logps.is_floating_point():
        raise TypeError(f"{caller}: `logps` must be a floating tensor, got {logps.dtype}.")
    B, T = logps.shape
    for arg, value in (("old_logps", old_logps), ("mask", mask)):
        if value.shape != logps.shape:
            raise ValueError(f"{caller}: `{arg}` must have the shape of `logps` {(B, T)}, got {tuple(value.shape)}.")
    if advantages.shape not in ((B,), (B, T)):
        raise ValueError(f"{caller}: `advantages` must be (B,) = {(B,)} or (B, T) = {(B, T)}, "
                         f"got {tuple(advantages.shape)}.")
    if old_logps.dtype != logps.dtype:
        raise TypeError(f"{caller}: `old_logps` dtype {old_logps.dtype} differs from `logps` dtype {logps.dtype}; "
                        "cast one of them (e.g. `old_logps.to(logps.dtype)`).")
    if not advantages.is_floating_point():
        raise TypeError(f"{caller}: `advantages` must be a floating tensor, got {advantages.dtype}.")
    for arg, value in (("old_logps", old_logps), ("advantages", advantages), ("mask", mask)):
        if value.device != logps.device:
            raise ValueError(f"{caller}: `{arg}` is on {value.device} but `logps` is on {logps.device}; "
                             "move all inputs to one device.")


def _checked_mask(mask: torch.Tensor, caller: str) -> torch.Tensor:
    """A 0/1 mask as bool; any other value (0.5, -1, NaN: all once read as 1) is an error. One comparison."""
    as_bool = mask != 0
    if torch.equal(as_bool.to(mask.dtype), mask):  # NaN never equals itself, so it fails here too
        return as_bool
    bad = mask[as_bool & (mask != 1)]
    raise ValueError(f"{caller}: `mask` must hold only 0 and 1 (or be a bool tensor), but {bad.numel()} entries are "
                     f"not, e.g. {bad[0].item()!r}; a value other than 0 would be read as 1. Fix: pass the response "
                     "mask as a bool tensor or 0/1 values (e.g. `(mask > 0.5)` if it holds weights).")


def _check_finite(logps, old_logps, advantages, mask) -> None:
    """Non-finite values at masked positions are ignored. At unmasked positions, +-inf log-probs are handled by the
    official +-20 clamp of the log-ratio; a NaN log-ratio or a non-finite advantage would make the loss NaN, so it
    is an error instead."""
    with torch.no_grad():
        # Fast path, one reduction per input: finite sums mean every element is finite, nothing to locate.
        logps_sum, old_sum, adv_sum = (t.sum(dtype=torch.float64) for t in (logps, old_logps, advantages))
        if torch.isfinite(logps_sum + old_sum + adv_sum):
            return
        bad_ratio = mask & torch.isnan(logps - old_logps)
        adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(mask)
        bad_adv = mask & ~torch.isfinite(adv)
        n_ratio, n_adv = int(bad_ratio.sum()), int(bad_adv.sum())
    if n_ratio or n_adv:
        raise non_finite_error(n_ratio, n_adv)


def resolve_backend(backend: str, logps: torch.Tensor, caller: str = "fipo_loss") -> str:
    """"auto": the fused Triton kernels for CUDA tensors when Triton is installed, the fused C kernel for CPU tensors
    when it builds, else the torch path. Float64 is the reference dtype and always runs in torch (the fused kernels
    compute in float32)."""
    if backend in DEPRECATED_BACKENDS:
        warnings.warn(f"{caller}: backend={backend!r} is deprecated and will be removed in 0.3.0: use "
                      f"backend={DEPRECATED_BACKENDS[backend]!r} (the fused C kernel).", DeprecationWarning,
                      stacklevel=4)  # the caller of fipo_loss / fipo_weights
        backend = DEPRECATED_BACKENDS[backend]
    if backend not in BACKENDS:
        raise ValueError(f"{caller}: `backend` = {backend!r} is invalid: use one of {BACKENDS}.")
    if backend != "auto":
        return backend
    if logps.dtype == torch.float64:
        return "torch"
    if logps.is_cuda:
        return "triton" if triton_usable(logps.device) else "torch"
    return "c" if logps.device.type == "cpu" and c_kernel_usable() else "torch"


def stack_stats(stats: dict[str, float | torch.Tensor]) -> torch.Tensor:
    """The stats as one 1-D tensor in key order (one stack when they are tensors of one dtype, as every path gives)."""
    values = list(stats.values())
    if all(isinstance(v, float) for v in values):
        return torch.tensor(values, dtype=torch.float64)
    if all(isinstance(v, torch.Tensor) and v.dtype == values[0].dtype for v in values):
        return torch.stack(values)
    return torch.stack([torch.as_tensor(v).double() for v in values])


def stats_over_ranks(stats: dict[str, float | torch.Tensor], accelerator=None) -> dict[str, float]:
    """One micro-batch's stats as floats, reduced over all ranks when there are several (one gather, run on every
    rank: each rank's stats are one row of the kernels' own reduction; one host transfer)."""
    if accelerator is not None and accelerator.num_processes > 1:
        local = stack_stats(stats).to(accelerator.device, torch.float32)
        gathered = accelerator.gather(local[None]).view(-1, len(STAT_NAMES))
        return dict(zip(STAT_NAMES, reduce_row_stats(gathered).tolist()))
    if any(isinstance(v, torch.Tensor) for v in stats.values()):
        return dict(zip(stats, stack_stats(stats).tolist()))
    return dict(stats)


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
        "weight_changed_ratio": stats["n_weight_changed"] / n,  # ours, not official: FIPO's activity
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


def _compute(logps, old_logps, advantages, mask, given: Hyperparameters, backend: str, with_loss: bool,
             caller: str) -> tuple[dict, str]:
    """Validate (``given`` holds the hyperparameters as passed), pick the compute path, run it; returns its result as
    a dict and the path's name."""
    h = _checked_hyperparameters(**given._asdict())
    _check_tensors(logps, old_logps, advantages, mask, caller)
    if mask.dtype != torch.bool:
        mask = _checked_mask(mask, caller)
    chosen = resolve_backend(backend, logps, caller)
    if chosen != "c":  # the C kernel checks finiteness in its own pass
        _check_finite(logps, old_logps, advantages, mask)
    return COMPUTE_PATHS[chosen](logps, old_logps, advantages, mask, h, with_loss=with_loss)._asdict(), chosen


def fipo_weights(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    decay_rate: float = DEFAULTS.decay_rate,
    clip_ratio: float = DEFAULTS.clip_ratio,
    clip_high_only: bool = DEFAULTS.clip_high_only,
    safety_threshold: float = DEFAULTS.safety_threshold,
    delta: float = DEFAULTS.delta,
    epsilon: float = DEFAULTS.epsilon,
    epsilon_high: float = DEFAULTS.epsilon_high,
    backend: str = "auto",
) -> FIPOWeights:
    """FIPO's influence weights of one micro-batch (docs/algorithm.md §1.1-1.5, §1.7, §1.9), without the loss: no
    loss value and no gradient work. What FIPOTrainer uses.

    Args:
        logps: (B, T) log pi_theta of the sampled tokens.
        old_logps: (B, T) log pi_old (the policy that generated the batch), same dtype as ``logps``.
        advantages: (B,) per response or (B, T) per token.
        mask: (B, T) response mask (bool or 0/1; any other value is an error). Masked positions may hold anything,
            NaN included.
        decay_rate: tau; gamma = 2^(-1/tau). clip_ratio, clip_high_only: f in [1, 1 + clip_ratio] when
            high-only, else [1 - clip_ratio, 1 + clip_ratio]; clip_ratio = 0 means min(exp F, 10).
        safety_threshold: for A < 0 and ratio > safety_threshold, f is clamped into [0.8, 1].
        delta: c; the dual-clip constant, the Future-KL ratio filter (ratio > c is left out of F) and the
            sequence filter (a response with > 1 token with A < 0 and ratio > c is dropped).
        epsilon, epsilon_high: the PPO clip range [1 - epsilon, 1 + epsilon_high].
        backend: "auto" (CUDA tensors: the fused Triton kernel when available; CPU tensors: the fused C kernel
            when it builds; otherwise, and for float64, the torch path), "c" ("cpu" before 0.2, deprecated), "torch",
            or "triton" (explicit, for tests and benchmarks; on CPU tensors only under TRITON_INTERPRET=1, else a
            RuntimeError). ``.backend`` of the result says which path ran.

    Float64 inputs are computed in float64, anything else in float32. The log-ratio is clamped to [-20, 20]
    (official), so +-inf log-probs at response tokens give finite values; a NaN log-ratio or a non-finite
    advantage at a response token raises ValueError rather than return NaN.
    """
    given = Hyperparameters(decay_rate, clip_ratio, clip_high_only, safety_threshold, delta, epsilon, epsilon_high)
    result, chosen = _compute(logps, old_logps, advantages, mask, given, backend, False, "fipo_weights")
    del result["loss"]  # None: no loss was computed
    return FIPOWeights(**result, backend=chosen)


def fipo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    decay_rate: float = DEFAULTS.decay_rate,
    clip_ratio: float = DEFAULTS.clip_ratio,
    clip_high_only: bool = DEFAULTS.clip_high_only,
    safety_threshold: float = DEFAULTS.safety_threshold,
    delta: float = DEFAULTS.delta,
    epsilon: float = DEFAULTS.epsilon,
    epsilon_high: float = DEFAULTS.epsilon_high,
    backend: str = "auto",
) -> FIPOLossOutput:
    """The official FIPO loss of one micro-batch (docs/algorithm.md §1): what ``fipo_weights`` returns (same
    arguments), plus ``loss``, differentiable w.r.t. ``logps`` (the only input that receives gradient; it flows
    through the importance ratio only, and is zero beyond the +-20 clamp). A loss that overflows although every input
    is finite (huge advantages) raises ValueError.
    """
    given = Hyperparameters(decay_rate, clip_ratio, clip_high_only, safety_threshold, delta, epsilon, epsilon_high)
    result, chosen = _compute(logps, old_logps, advantages, mask, given, backend, True, "fipo_loss")
    if not torch.isfinite(result["loss"]):  # inputs were checked finite: only huge advantages get here
        largest = advantages.detach().abs().max().item()
        raise ValueError(f"fipo_loss: the loss overflows to {result['loss'].item()} although every input is finite: "
                         f"`advantages` are too large (largest |value| = {largest:.3g}; the surrogate multiplies them "
                         "by ratios up to `delta` and weights up to 10). Scale the advantages down; in a trainer, "
                         "scale the rewards down or keep scale_rewards='group', which normalises them.")
    return FIPOLossOutput(**result, backend=chosen)
