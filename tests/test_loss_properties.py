"""fipo_loss beyond the official vectors: long rows, memory, random shapes, bad and degenerate input."""

import math

import pytest
import torch

from fipo_trl import fipo_loss
from fipo_trl.kernels import (
    discounted_reverse_cumsum,
    discounted_reverse_cumsum_naive,
    fipo_loss_naive,
)
from fipo_trl.kernels.fipo_cpu import cpu_kernel_usable
from fipo_trl.loss import decay_to_gamma
from fipo_trl.testing import AllocationProbe


def random_batch(B, T, *, seed=0, dtype=torch.float32, scale=0.05, holes=True):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logps = old + torch.randn(B, T, generator=g, dtype=torch.float64) * scale
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    if holes:
        mask &= torch.rand(B, T, generator=g) > 0.1
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logps.to(dtype), old.to(dtype), adv.to(dtype), mask


@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 200, 4097])
@pytest.mark.parametrize("gamma", [0.5, decay_to_gamma(32.0), 0.999])
def test_blocked_scan_matches_sequential_recursion(T, gamma):
    x = torch.randn(3, T, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
    expected = discounted_reverse_cumsum_naive(x, gamma)
    torch.testing.assert_close(discounted_reverse_cumsum(x, gamma), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(discounted_reverse_cumsum(x.float(), gamma).double(), expected, rtol=0, atol=2e-5)


CPU_PATHS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not cpu_kernel_usable(), reason="no C kernel"))]


@pytest.mark.parametrize("backend", CPU_PATHS)
def test_long_rows_fp32_weights_match_float64_reference(backend):
    """T = 32,768 (official max response 20,480, 7B context 32K): fp32 weights within 1e-5 of float64, on both CPU
    paths (the torch blocked scan and the C kernel)."""
    B, T = 2, 32768
    logps, old, adv, mask = random_batch(B, T, seed=1, dtype=torch.float64, scale=0.02)
    for clip_ratio, high_only in ((0.2, True), (0.2, False), (0.0, True)):
        out = fipo_loss(logps.float(), old.float(), adv.float(), mask, clip_ratio=clip_ratio,
                        clip_high_only=high_only, backend=backend)
        ref = fipo_loss_naive(logps, old, adv, mask, clip_ratio=clip_ratio, clip_high_only=high_only)
        assert (out.weights.double() - ref["w"]).abs().max() <= 1e-5
        # F itself grows to |F| ~ 1/(1 - gamma) * |delta| ~ 1; hold it to 1e-5 relative
        assert ((out.future_kl.double() - ref["future_kl"]).abs() / ref["future_kl"].abs().clamp(min=1)).max() <= 1e-5
        assert abs(out.loss.item() - ref["loss"].item()) <= 1e-5


@pytest.mark.parametrize("backend", CPU_PATHS)
def test_weight_computation_memory_is_linear_in_T(backend):
    """No T x T or T x chunk tensor is ever created: the largest allocation is O(B * T) and the peak of live bytes
    stays a small multiple of one (B, T) fp32 tensor. The official code would allocate T^2 * 4 bytes = 4 GiB here.
    (The C kernel's own memory, outside torch, is B x 26 doubles and 8 KiB of stack per chunk.)"""
    B, T = 2, 32768
    logps, old, adv, mask = random_batch(B, T, seed=2)
    probe = AllocationProbe()
    with probe, torch.no_grad():
        out = fipo_loss(logps, old, adv, mask, backend=backend)
    row_bytes = B * T * 4
    assert out.weights.shape == (B, T)
    assert probe.largest_numel <= 2 * B * T, probe.largest_numel  # float64 intermediates count double at most
    assert probe.peak <= 40 * row_bytes, f"peak {probe.peak / row_bytes:.1f} x (B, T) fp32"


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("clip", [(0.2, True), (0.2, False), (0.0, True)])
def test_random_batches_match_reference_with_gradients(seed, clip):
    B, T = 4, 150
    logps, old, adv, mask = random_batch(B, T, seed=seed, dtype=torch.float64, scale=1.5)  # large ratios: filters hit
    kwargs = dict(clip_ratio=clip[0], clip_high_only=clip[1], safety_threshold=3.0, decay_rate=8.0)
    ref = fipo_loss_naive(logps, old, adv, mask, **kwargs)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        leaf = logps.detach().to(dtype).clone().requires_grad_()
        out = fipo_loss(leaf, old.to(dtype), adv.to(dtype), mask, **kwargs)
        out.loss.backward()
        assert abs(out.loss.item() - ref["loss"].item()) <= tol * max(1, abs(ref["loss"].item()))
        torch.testing.assert_close(leaf.grad.double(), ref["grad_logp"], rtol=0, atol=tol)
        expected_weighted = adv.double()[:, None] * mask * ref["w"]  # A * f on the response, 0 elsewhere
        torch.testing.assert_close(out.weighted_advantages.double(), expected_weighted, rtol=tol, atol=tol)
        torch.testing.assert_close(torch.where(mask, out.weights.double(), 0), torch.where(mask, ref["w"], 0),
                                   rtol=tol, atol=tol)
        assert torch.equal(out.keep, ref["seq_valid"] > 0)


def test_bfloat16_inputs_compute_in_float32():
    logps, old, adv, mask = random_batch(3, 40, seed=3)
    leaf = logps.bfloat16().requires_grad_()
    out = fipo_loss(leaf, old.bfloat16(), adv, mask)
    out.loss.backward()
    assert out.weights.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert leaf.grad.dtype == torch.bfloat16 and torch.isfinite(leaf.grad.float()).all()
    ref = fipo_loss(leaf.detach().float(), old.bfloat16().float(), adv, mask)
    torch.testing.assert_close(out.weights, ref.weights)


def test_sequence_filter_drops_rows_with_two_dual_clipped_tokens():
    old = torch.full((3, 4), -5.0, dtype=torch.float64)
    logps = old.clone()
    logps[0, :2] += 3.0  # A < 0, ratio e^3 = 20 > c twice: dropped
    logps[1, 0] += 3.0  # once: kept
    logps[2, :2] += 3.0  # A > 0: the dual clip only concerns negative advantages, kept
    adv = torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)
    out = fipo_loss(logps, old, adv, torch.ones(3, 4, dtype=torch.bool))
    assert out.keep.tolist() == [False, True, True]
    assert out.metrics["dropped_seq_ratio"] == pytest.approx(1 / 3)
    kept_only = fipo_loss(logps[1:], old[1:], adv[1:], torch.ones(2, 4, dtype=torch.bool))
    assert out.loss.item() == pytest.approx(kept_only.loss.item(), abs=1e-12)  # gone from the denominator too


def test_masked_positions_may_hold_anything():
    logps, old, adv, mask = random_batch(3, 30, seed=4, dtype=torch.float64)
    clean = fipo_loss(logps, old, adv, mask)
    dirty_logps = torch.where(mask, logps, torch.tensor(float("nan"), dtype=torch.float64)).requires_grad_()
    dirty_old = torch.where(mask, old, torch.tensor(float("-inf"), dtype=torch.float64))
    dirty = fipo_loss(dirty_logps, dirty_old, adv, mask)
    dirty.loss.backward()
    assert dirty.loss.item() == clean.loss.item()
    assert torch.equal(torch.where(mask, dirty.weights, 0), torch.where(mask, clean.weights, 0))
    assert torch.isfinite(dirty.weights).all() and torch.isfinite(dirty_logps.grad).all()
    assert (dirty_logps.grad[~mask] == 0).all()


def test_empty_and_all_masked_batches_are_finite():
    for B, T in ((2, 0), (0, 5), (3, 7)):
        logps = torch.zeros(B, T, requires_grad=True)
        out = fipo_loss(logps, torch.zeros(B, T), torch.ones(B), torch.zeros(B, T, dtype=torch.bool))
        out.loss.backward()
        assert out.loss.item() == 0.0 and out.weights.shape == (B, T) and torch.isfinite(out.weights).all()
        assert logps.grad.shape == (B, T) and (logps.grad == 0).all()
        assert out.metrics["influence_weights_mean"] == 0.0
        assert math.isnan(out.metrics["influence_weights_min"])  # no token: no minimum


def test_infinite_log_probs_at_response_tokens_are_clamped_not_nan():
    """Official semantics: the log-ratio is clamped to [-20, 20], so +-inf gives ratio e^+-20 and zero gradient."""
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    logps = torch.tensor([[float("-inf"), -1.0, float("inf")]], requires_grad=True)
    out = fipo_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 3, dtype=torch.bool))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.weights).all()
    assert logps.grad[0, 0] == 0 and logps.grad[0, 2] == 0 and logps.grad[0, 1] != 0
    assert out.metrics["filtered_ratio"] == pytest.approx(1 / 3)  # ratio e^20 > c leaves the Future-KL


@pytest.mark.parametrize(
    "logps, old, match",
    [
        ([[float("nan"), -1.0]], [[-1.0, -1.0]], "NaN log-ratio"),
        ([[-1.0, -1.0]], [[float("nan"), -1.0]], "NaN log-ratio"),
        ([[float("inf"), -1.0]], [[float("inf"), -1.0]], "same infinity"),
    ],
)
def test_nan_log_ratio_at_response_token_raises(logps, old, match):
    with pytest.raises(ValueError, match=match):
        fipo_loss(torch.tensor(logps), torch.tensor(old), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool))


def test_non_finite_advantage_at_response_token_raises():
    with pytest.raises(ValueError, match="non-finite advantage"):
        fipo_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([1.0, float("nan")]), torch.ones(2, 2))
    # ...but not when that response has no token left
    out = fipo_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([1.0, float("nan")]),
                    torch.tensor([[1, 1], [0, 0]]))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"decay_rate": 0.0}, "decay_rate"),
        ({"decay_rate": -3.0}, "decay_rate"),
        ({"decay_rate": float("inf")}, "decay_rate"),
        ({"decay_rate": float("nan")}, "decay_rate"),
        ({"clip_ratio": -0.1}, "clip_ratio"),
        ({"clip_ratio": 1.0, "clip_high_only": False}, "clip_ratio"),
        ({"safety_threshold": 0.0}, "safety_threshold"),
        ({"dual_clip": 1.2}, "dual_clip"),
        ({"dual_clip": 1.28}, "dual_clip"),
        ({"epsilon_low": 1.0}, "epsilon_low"),
        ({"epsilon_high": -0.1}, "epsilon_high"),
    ],
)
def test_bad_hyperparameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"`{field}` = .*Use"):
        fipo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), **kwargs)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.zeros(2), torch.zeros(2), torch.ones(1), torch.ones(2)), ValueError, "`logps` must be"),
        ((torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2), torch.ones(2, 3)), ValueError, "`old_logps` must"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.ones(3, 3)), ValueError, "`mask` must"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3), torch.ones(2, 3)), ValueError, "`advantages` must"),
        ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64), torch.ones(2), torch.ones(2, 3)), TypeError,
         "dtype"),
        ((torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.ones(2), torch.ones(2, 3)), TypeError,
         "floating"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, dtype=torch.long), torch.ones(2, 3)), TypeError,
         "`advantages` must be a floating"),
        ((torch.zeros(2, 3), torch.zeros(2, 3).to("meta"), torch.ones(2), torch.ones(2, 3)), ValueError, "device"),
        (([[0.0]], torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1)), TypeError, "torch.Tensor"),
    ],
)
def test_bad_tensors_get_clear_errors(args, error, match):
    with pytest.raises(error, match=match):
        fipo_loss(*args)


@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.05, 0.3, 1.0, 4.0, 30.0])
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("clip", [(0.2, True), (0.2, False), (0.0, True)])
def test_every_fast_path_branch_matches_the_reference(scale, per_token_adv, clip):
    """The torch path skips branches that the batch's log-ratio range makes impossible (ratio above c, above the
    safety threshold, beyond +-20, ...): sweep log-ratio scales from 0 (on-policy) to 30 (clamped) so every
    branch is both taken and skipped, with per-row and per-token advantages, against the float64 oracle."""
    logps, old, adv, mask = random_batch(5, 90, seed=int(scale * 100) + per_token_adv, dtype=torch.float64,
                                         scale=scale)
    if per_token_adv:
        adv = adv[:, None] * (1 + torch.rand(5, 90, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    kwargs = dict(clip_ratio=clip[0], clip_high_only=clip[1], safety_threshold=3.0, decay_rate=4.0)
    ref = fipo_loss_naive(logps, old, adv, mask, **kwargs)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        leaf = logps.detach().to(dtype).clone().requires_grad_()
        out = fipo_loss(leaf, old.to(dtype), adv.to(dtype), mask, backend="torch", **kwargs)
        out.loss.backward()
        assert abs(out.loss.item() - ref["loss"].item()) <= tol * max(1.0, abs(ref["loss"].item()))
        torch.testing.assert_close(leaf.grad.double(), ref["grad_logp"], rtol=tol, atol=tol)
        torch.testing.assert_close(torch.where(mask, out.weights.double(), 0), torch.where(mask, ref["w"], 0),
                                   rtol=tol, atol=tol)
        assert torch.equal(out.keep, ref["seq_valid"] > 0)
        assert out.metrics["filtered_ratio"] == pytest.approx(
            1 - ref["participates"][mask].mean().item(), abs=1e-6)
