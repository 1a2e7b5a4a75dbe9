"""Every compute path (torch, the C kernel, Triton under TRITON_INTERPRET=1) directly against the float64 reference
(kernels/naive.py), with the loss and its gradient and in weights-only mode, on shapes across each path's block
boundaries, every clip mode, (B,) and (B, T) advantages, half-precision inputs and degenerate batches.

The interpreter runs a custom scan as a Python loop, so Triton shapes stay small and its block size is a parameter:
T crosses one or several blocks (just below / at / above the block size). The C kernel walks rows in chunks of 256
tokens and the torch scan in blocks of 64; their shapes cross those boundaries the same way.
"""

import math

import pytest
import torch
from allocation_probe import AllocationProbe
from kernel_utils import (
    BACKEND_MARKS,
    BACKENDS,
    CLIP_MODES,
    WITH_LOSS,
    assert_matches_reference,
    hyperparameters,
    needs_c_kernel,
    random_batch,
    reference,
    run_path,
)

from fipo_trl import fipo_loss, fipo_weights
from fipo_trl.kernels import Hyperparameters
from fipo_trl.kernels.fipo_cpu import CHUNK_SIZE
from fipo_trl.kernels.scan import SCAN_BLOCK_SIZE
from fipo_trl.loss import COMPUTE_PATHS

# (B, T, block size): T just below / at / above one block, several blocks, for each path's own block
SHAPES = {
    "triton": [(3, 1, 16), (3, 15, 16), (3, 16, 16), (3, 17, 16), (4, 47, 16), (4, 70, 16), (3, 31, 32), (3, 33, 32)],
    "c": [(3, 1, None), (3, CHUNK_SIZE - 1, None), (3, CHUNK_SIZE, None), (3, CHUNK_SIZE + 1, None),
          (4, 3 * CHUNK_SIZE + 7, None), (5, 2 * CHUNK_SIZE, None)],
    "torch": [(3, 1, None), (3, SCAN_BLOCK_SIZE - 1, None), (3, SCAN_BLOCK_SIZE, None), (3, SCAN_BLOCK_SIZE + 1, None),
              (4, 3 * SCAN_BLOCK_SIZE + 7, None), (5, 2 * SCAN_BLOCK_SIZE, None)],
}
SHAPE_PARAMS = [pytest.param(backend, *shape, marks=BACKEND_MARKS[backend]) for backend in SHAPES
                for shape in SHAPES[backend]]


@pytest.mark.parametrize("with_loss", WITH_LOSS)
@pytest.mark.parametrize(("backend", "B", "T", "block_size"), SHAPE_PARAMS)
@pytest.mark.parametrize("clip_mode", sorted(CLIP_MODES))
def test_random_shapes_across_block_boundaries(backend, B, T, block_size, clip_mode, with_loss):
    logps, old, adv, mask = random_batch(B, T, seed=T * 7 + (block_size or 0))
    h = hyperparameters(clip_mode)
    out, grad = run_path(backend, logps, old, adv, mask, h, with_loss=with_loss, block_size=block_size)
    assert_matches_reference(out, reference(logps, old, adv, mask, h), torch.float32, grad)
    assert not out.keep[3] if B > 3 else True  # the sequence filter fired


@pytest.mark.parametrize("with_loss", WITH_LOSS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip_mode", sorted(CLIP_MODES))
def test_per_token_advantages_and_official_decay(clip_mode, backend, with_loss):
    logps, old, adv, mask = random_batch(4, 40 if backend == "triton" else 600, seed=11, per_token_adv=True,
                                         scale=0.5)
    h = hyperparameters(clip_mode, decay_rate=32.0, safety_threshold=10.0)
    out, grad = run_path(backend, logps, old, adv, mask, h, with_loss=with_loss, block_size=16)
    assert_matches_reference(out, reference(logps, old, adv, mask, h), torch.float32, grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("clip_mode", sorted(CLIP_MODES))
def test_random_batches_with_gradients(backend, seed, clip_mode):
    """Large ratios (every filter hits), (B,) advantages; float64 too where the path computes in it (torch)."""
    for dtype in (torch.float64, torch.float32) if backend == "torch" else (torch.float32,):
        logps, old, adv, mask = random_batch(4, 150, seed=seed, dtype=dtype)
        h = hyperparameters(clip_mode)
        out, grad = run_path(backend, logps, old, adv, mask, h, block_size=32)
        assert_matches_reference(out, reference(logps, old, adv, mask, h), dtype, grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_token_adv", [False, True], ids=["adv_B", "adv_BT"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_compute_in_float32_and_keep_grad_dtype(per_token_adv, backend, dtype):
    logps, old, adv, mask = random_batch(3, 37, seed=5, per_token_adv=per_token_adv)
    logps, old = logps.to(dtype), old.to(dtype)
    h = hyperparameters("two_sided")
    out, grad = run_path(backend, logps, old, adv, mask, h, block_size=16)
    assert out.weights.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert grad.dtype == dtype
    # the reference sees the same half-precision values; the path computes in fp32 and rounds the gradient once
    assert_matches_reference(out, reference(logps, old, adv, mask, h), torch.float32, grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_log_probs_and_all_masked_batch(backend):
    logps, old, adv, mask = random_batch(3, 20, seed=3)
    logps[0, 2], logps[0, 5], old[2, 0] = -math.inf, math.inf, -math.inf  # clamped to +-20, zero gradient
    mask[2, 0] = True
    h = hyperparameters("high_only")
    out, grad = run_path(backend, logps, old, adv, mask, h, block_size=16)
    assert_matches_reference(out, reference(logps, old, adv, mask, h), torch.float32, grad)
    assert grad[0, 2] == 0 and grad[0, 5] == 0 and grad[2, 0] == 0
    empty = torch.zeros_like(mask)
    out, grad = run_path(backend, logps, old, adv, empty, h, block_size=16)
    assert_matches_reference(out, reference(logps, old, adv, empty, h), torch.float32, grad)
    assert out.loss.item() == 0.0 and math.isinf(float(out.stats["min_weight"]))


@pytest.mark.parametrize("with_loss", WITH_LOSS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("B", "T"), [(0, 5), (2, 0)])
def test_empty_batch(backend, B, T, with_loss):
    logps, old, mask = torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B, T, dtype=torch.bool)
    out, grad = run_path(backend, logps, old, torch.zeros(B), mask, hyperparameters(), with_loss=with_loss)
    assert_matches_reference(out, reference(logps, old, torch.zeros(B), mask, hyperparameters()), torch.float32, grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_scales_with_upstream_gradient(backend):
    logps, old, adv, mask = random_batch(3, 24, seed=9)
    h = hyperparameters()
    leaf = logps.detach().clone().requires_grad_()
    out = COMPUTE_PATHS[backend](leaf, old, adv, mask, h)
    (out.loss * 3.0).backward()
    assert_matches_reference(out, reference(logps, old, adv, mask, h), torch.float32, leaf.grad / 3.0)


LONG_ROW_PATHS = [pytest.param("torch"), pytest.param("c", marks=needs_c_kernel)]  # the interpreter is too slow


@pytest.mark.parametrize("backend", LONG_ROW_PATHS)
@pytest.mark.parametrize("clip_mode", sorted(CLIP_MODES))
def test_long_rows_match_the_reference(backend, clip_mode):
    """T = 32,768 (official max response 20,480, 7B context 32K): fp32 weights within 1e-5 of float64."""
    logps, old, adv, mask = random_batch(2, 32768, seed=1, scale=0.02)
    h = hyperparameters(clip_mode, decay_rate=32.0, safety_threshold=10.0)
    out, _ = run_path(backend, logps, old, adv, mask, h, with_loss=False)
    ref = reference(logps, old, adv, mask, h)
    assert (out.weights.double() - ref["w"]).abs().max() <= 1e-5
    # F itself grows to |F| ~ 1/(1 - gamma) * |delta| ~ 1; hold it to 1e-5 relative
    assert ((out.future_kl.double() - ref["future_kl"]).abs() / ref["future_kl"].abs().clamp(min=1)).max() <= 1e-5
    out, _ = run_path(backend, logps, old, adv, mask, h)
    assert abs(out.loss.item() - ref["loss"].item()) <= 1e-5


@pytest.mark.parametrize("with_loss", WITH_LOSS)
@pytest.mark.parametrize("backend", LONG_ROW_PATHS)
def test_memory_is_linear_in_T(backend, with_loss):
    """No T x T or T x chunk tensor is ever created: the largest allocation is O(B * T) and the peak of live bytes
    stays a small multiple of one (B, T) fp32 tensor. The official code would allocate T^2 * 4 bytes = 4 GiB here.
    (The C kernel's own memory, outside torch, is 8 KiB of stack per chunk.)"""
    B, T = 2, 32768
    logps, old, adv, mask = random_batch(B, T, seed=2, scale=0.05)
    probe = AllocationProbe()
    with probe, torch.no_grad():
        out = (fipo_loss if with_loss else fipo_weights)(logps, old, adv, mask, backend=backend)
    row_bytes = B * T * 4
    assert out.weights.shape == (B, T)
    assert probe.largest_numel <= 2 * B * T, probe.largest_numel  # float64 intermediates count double at most
    assert probe.peak <= 40 * row_bytes, f"peak {probe.peak / row_bytes:.1f} x (B, T) fp32"


@pytest.mark.parametrize("backend", [pytest.param("torch"), pytest.param("c", marks=needs_c_kernel)])
@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.05, 0.3, 1.0, 4.0, 30.0])
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("clip_mode", sorted(CLIP_MODES))
def test_every_fast_path_branch_matches_the_reference(backend, scale, per_token_adv, clip_mode):
    """The torch path skips branches that the batch's log-ratio range makes impossible (ratio above c, above the
    safety threshold, beyond +-20, ...): sweep log-ratio scales from 0 (on-policy) to 30 (clamped) so every
    branch is both taken and skipped, with per-row and per-token advantages; the C kernel on the same sweep."""
    h = hyperparameters(clip_mode, decay_rate=4.0)
    for dtype in (torch.float64, torch.float32) if backend == "torch" else (torch.float32,):
        logps, old, adv, mask = random_batch(5, 90, seed=int(scale * 100) + per_token_adv, scale=scale,
                                             per_token_adv=per_token_adv, dtype=dtype, drop_row=False)
        out, grad = run_path(backend, logps, old, adv, mask, h)
        assert_matches_reference(out, reference(logps, old, adv, mask, h), dtype, grad)


# The compiled kernel's exp/exp2 are approximations the interpreter does not make (docs/gpu.md, "Accuracy"):
# errors up to ~3.5e-5 relative in an emulated worst case, so the CUDA check compares at 1e-4 instead of 1e-5.
COMPILED_FLOAT32_TOLERANCE = 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["row", "chunk"])
@pytest.mark.parametrize("with_loss", WITH_LOSS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_the_reference(dtype, with_loss, variant, monkeypatch):
    import kernel_utils

    from fipo_trl.kernels import fipo_triton

    assert not fipo_triton.TRITON_INTERPRETED, "TRITON_INTERPRET=1 would run the interpreter on CUDA tensors"
    monkeypatch.setitem(kernel_utils.TOLERANCE, torch.float32, COMPILED_FLOAT32_TOLERANCE)
    logps, old, adv, mask = (t.cuda() for t in random_batch(8, 5000, seed=0, scale=0.3))
    logps, old = logps.to(dtype), old.to(dtype)
    h = Hyperparameters()
    leaf = logps.detach().clone().requires_grad_(with_loss)
    out = fipo_triton.compute_triton(leaf, old, adv, mask, h, with_loss=with_loss, variant=variant)
    grad = None
    if with_loss:
        out.loss.backward()
        grad = leaf.grad
    assert_matches_reference(out, reference(logps, old, adv, mask, h), torch.float32, grad)
