"""What the kernel tests share: the compute paths as pytest parameters, batches that make every rule fire, and ONE
comparison of a path's result with the float64 reference (``fipo_trl.kernels.naive.fipo_loss_naive``)."""

import math

import pytest
import torch

from fipo_trl.kernels import STAT_NAMES, Hyperparameters, c_kernel_status, c_kernel_usable, triton_usable
from fipo_trl.kernels.naive import fipo_loss_naive
from fipo_trl.loss import COMPUTE_PATHS, metrics_from_stats

needs_interpreter = pytest.mark.skipif(not triton_usable(torch.device("cpu")),
                                       reason="needs triton and TRITON_INTERPRET=1 before import (tests/conftest.py)")
needs_c_kernel = pytest.mark.skipif(not c_kernel_usable(), reason=f"C kernel unavailable: {c_kernel_status()}")
BACKEND_MARKS = {"torch": (), "c": (needs_c_kernel,), "triton": (needs_interpreter,)}
BACKENDS = [pytest.param(name, marks=marks) for name, marks in BACKEND_MARKS.items()]
WITH_LOSS = [pytest.param(True, id="loss"), pytest.param(False, id="weights")]
CLIP_MODES = {"high_only": (0.2, True), "two_sided": (0.2, False), "uncapped": (0.0, True)}

# Tolerances against the float64 reference, by the dtype a path computes in, relative to max(1, |expected|):
# - float64 (the torch path on float64 inputs): the same operations in the same precision, only in another order
#   (the blocked scan, the reductions): ~1e-16 rounding per operation, 1.4e-15 measured at worst; 1e-12 is tight
#   and still safe.
# - float32 (every path on fp32/bf16/fp16 inputs): fp32 rounds each operation by up to 6e-8 relative. The longest
#   chains are F, a discounted sum of ~1/(1 - gamma) log-ratios (46 at tau = 32), whose error exp carries into
#   f (<= 10) and A * f, and the stats' sums over up to thousands of tokens. The largest error measured over these
#   tests is 2.5e-6 (the batch sum of the log-ratios; F 9e-7, f 7e-7); 1e-5 leaves a 4x margin and stays far below
#   what a wrong decision costs (a flipped clip, filter or sequence-filter decision moves a value by >= 1e-3, and
#   the counts are compared exactly).
# - a gradient returned in bf16/fp16 is rounded once more, by up to 2^-8 (bf16) / 2^-11 (fp16) relative.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
GRADIENT_ROUNDING = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def hyperparameters(clip_mode="high_only", decay_rate=8.0, safety_threshold=3.0, delta=10.0) -> Hyperparameters:
    """Defaults that make every rule fire on ``random_batch``: a short decay, a low safety threshold."""
    clip_ratio, high_only = CLIP_MODES[clip_mode]
    return Hyperparameters(decay_rate=decay_rate, clip_ratio=clip_ratio, clip_high_only=high_only,
                           safety_threshold=safety_threshold, delta=delta)


def reference(logps, old, adv, mask, h: Hyperparameters) -> dict:
    """The float64 reference (``kernels/naive.py``) of one batch, for ``assert_matches_reference``."""
    return fipo_loss_naive(logps, old, adv, mask, **h._asdict())


def random_batch(B, T, *, seed, per_token_adv=False, scale=1.5, dtype=torch.float32, drop_row=True):
    """Log-ratios up to ~+-5 at scale 1.5 (every filter, clip and the dual clip fire), holes, right padding, a full
    and an empty row, NaN at masked positions (they may hold anything) and, with ``drop_row``, a row that the
    sequence filter drops."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    logps = old + torch.randn(B, T, generator=g, dtype=torch.float64) * scale
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.15)
    if B > 2:
        mask[1] = False  # an empty row
        mask[0] = True  # a full row
    adv = torch.randn(*((B, T) if per_token_adv else (B,)), generator=g, dtype=torch.float64)
    if drop_row and B > 3 and T > 1:  # row 3: two dual-clipped tokens (A < 0, ratio e^3 > 10): the filter drops it
        mask[3, :2] = True
        logps[3, :2] = old[3, :2] + 3.0
        adv[3] = -adv[3].abs() - 0.1
    logps = torch.where(mask, logps, torch.nan)
    return logps.to(dtype), old.to(dtype), adv.to(dtype), mask


def run_path(backend, logps, old, adv, mask, h, *, with_loss=True, block_size=None):
    """One compute path on a fresh leaf; returns (result, d loss / d logps or None)."""
    leaf = logps.detach().clone().requires_grad_(with_loss)
    options = {"block_size": block_size} if backend == "triton" and block_size else {}
    result = COMPUTE_PATHS[backend](leaf, old, adv, mask, h, with_loss=with_loss, **options)
    if not with_loss:
        assert result.loss is None
        return result, None
    result.loss.backward()
    return result, leaf.grad


def _assert_close(actual, expected, tol, what, rtol=0.0):
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).double().cpu()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    error = (actual - expected).abs()
    allowed = tol * expected.abs().clamp(min=1) + rtol * expected.abs()
    worst = (error - allowed).max().item() if error.numel() else -1.0
    assert worst <= 0, f"{what}: max |error| {error.max().item():.3g} exceeds the tolerance"


def assert_matches_reference(out, ref, dtype, grad=None):
    """A path's result (``FIPOResult``, ``FIPOWeights`` or ``FIPOLossOutput``) against ``fipo_loss_naive`` on the same
    inputs: F, f, A * f, keep, the loss and its gradient (when given), every stat (counts exactly) and every metric.
    ``dtype`` is the dtype the path computes in (float64 or float32); the tolerances are explained above."""
    tol = TOLERANCE[dtype]
    _assert_close(out.future_kl, ref["future_kl"], tol, "future_kl")
    _assert_close(out.weights, ref["w"], tol, "weights")
    _assert_close(out.weighted_advantages, ref["weighted_advantages"], tol, "weighted_advantages")
    assert torch.equal(out.keep.cpu(), ref["seq_valid"].cpu() > 0), "keep"
    if getattr(out, "loss", None) is not None:
        assert out.loss.dtype == dtype
        _assert_close(out.loss, ref["loss"], tol, "loss")
    if grad is not None:
        _assert_close(grad, ref["grad_logp"], tol, "gradient", rtol=2 * GRADIENT_ROUNDING.get(grad.dtype, 0.0))
    assert tuple(out.stats) == STAT_NAMES
    for name, expected in ref["stats"].items():
        actual = out.stats[name]
        assert isinstance(actual, float) or (actual.dim() == 0 and actual.dtype == dtype), name
        actual = float(actual)
        if name.startswith("n_") or math.isinf(expected):  # counts and the empty-set sentinels: exact
            assert actual == expected, (name, actual, expected)
        else:
            _assert_close(actual, expected, tol, name)
    metrics, expected_metrics = metrics_from_stats(out.stats), metrics_from_stats(ref["stats"])
    assert list(metrics) == list(expected_metrics)
    for name, expected in expected_metrics.items():
        if math.isnan(expected):
            assert math.isnan(metrics[name]), name
        else:
            _assert_close(metrics[name], expected, tol, name)
