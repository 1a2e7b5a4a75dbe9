"""The fused Triton kernels (kernels/fipo_triton.py) against the torch path, on CPU through TRITON_INTERPRET=1.

The interpreter runs a custom scan as a Python loop, so shapes stay small and the block size is a parameter:
T crosses one or several blocks (just below / at / above the block size) with holes, right padding and empty rows.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fipo_trl import fipo_loss
from fipo_trl.kernels import fipo_loss_torch, fipo_loss_triton, fipo_weights_triton, triton_usable
from fipo_trl.loss import decay_to_gamma, metrics_from_stats

pytestmark = pytest.mark.skipif(not triton_usable(torch.device("cpu")),
                                reason="needs triton and TRITON_INTERPRET=1 before import (tests/conftest.py sets it)")

VECTORS = json.loads((Path(__file__).parent / "data" / "official_vectors.json").read_text())
CLIP_MODES = {"high_only": (0.2, True), "two_sided": (0.2, False), "uncapped": (0.0, True)}
TOL = 1e-5


def hyperparameters(clip_mode="high_only", decay_rate=8.0, safety_threshold=3.0, dual_clip=10.0):
    clip_ratio, high_only = CLIP_MODES[clip_mode]
    return dict(gamma=decay_to_gamma(decay_rate), clip_ratio=clip_ratio, clip_high_only=high_only,
                safety_threshold=safety_threshold, dual_clip=dual_clip, epsilon_low=0.2, epsilon_high=0.28)


def random_batch(B, T, *, seed, per_token_adv=False, scale=1.5):
    """Log-ratios up to ~+-5 (every filter, clip and the dual clip fire), holes, right padding, one empty row."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 4
    logps = old + torch.randn(B, T, generator=g) * scale
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.15)
    if B > 2:
        mask[1] = False  # an empty row
        mask[0] = True  # a full row
    adv = torch.randn(B, T, generator=g) if per_token_adv else torch.randn(B, generator=g)
    if B > 3 and T > 1:  # row 3: two dual-clipped tokens (A < 0, ratio > 10), dropped by the sequence filter
        mask[3, :2] = True
        logps[3, :2] = old[3, :2] + 3.0
        adv[3] = -adv[3].abs() - 0.1
    logps = torch.where(mask, logps, torch.nan)  # masked positions may hold anything
    return logps, old, adv, mask


def assert_same_result(fused, reference, fused_grad=None, reference_grad=None):
    scale = reference.future_kl.abs().clamp(min=1)
    relative_error = (fused.future_kl - reference.future_kl).abs() / scale
    assert relative_error.numel() == 0 or relative_error.max() <= TOL
    torch.testing.assert_close(fused.weights, reference.weights, rtol=0, atol=TOL)
    assert abs(fused.loss.item() - reference.loss.item()) <= TOL * max(1.0, abs(reference.loss.item()))
    assert torch.equal(fused.keep, reference.keep)
    if reference_grad is not None:
        torch.testing.assert_close(fused_grad.float(), reference_grad.float(), rtol=0, atol=TOL)
    assert list(fused.stats) == list(reference.stats)
    for key, expected in reference.stats.items():
        actual = fused.stats[key]
        assert actual.dtype == expected.dtype and actual.dim() == 0, key
        if math.isinf(expected.item()):
            assert actual.item() == expected.item(), key  # the empty-extremum sentinels
        elif key.startswith("n_"):
            assert actual.item() == expected.item(), key
        else:
            assert abs(actual.item() - expected.item()) <= TOL * max(1.0, abs(expected.item())), key
    metrics, expected_metrics = metrics_from_stats(fused.stats), metrics_from_stats(reference.stats)
    for key, expected in expected_metrics.items():
        torch.testing.assert_close(metrics[key], expected, rtol=TOL, atol=TOL, equal_nan=True)


def run_both(logps, old, adv, mask, block_size, **kwargs):
    """Fused loss (with gradient), fused weight kernel, and the torch path on the same inputs."""
    fused_leaf = logps.detach().clone().requires_grad_()
    torch_leaf = logps.detach().clone().requires_grad_()
    fused = fipo_loss_triton(fused_leaf, old, adv, mask, block_size=block_size, **kwargs)
    reference = fipo_loss_torch(torch_leaf, old, adv, mask, **kwargs)
    fused.loss.backward()
    reference.loss.backward()
    weights_only = fipo_weights_triton(logps, old, adv, mask, block_size=block_size, **kwargs)
    return fused, fused_leaf.grad, reference, torch_leaf.grad, weights_only


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_official_vectors_match_torch_path(name):
    case = VECTORS[name]
    inputs, h = case["inputs"], case["hyperparameters"]
    logps, old, adv = (torch.tensor(inputs[k], dtype=torch.float32) for k in ("logp", "old_logp", "adv"))
    mask = torch.tensor(inputs["mask"]) != 0
    kwargs = dict(gamma=decay_to_gamma(h["decay_rate"]), clip_ratio=h["fkl_clip_ratio"],
                  clip_high_only=h["clip_high_only"], safety_threshold=h["safety_thresh"], dual_clip=h["clip_ratio_c"],
                  epsilon_low=h["eps_low"], epsilon_high=h["eps_high"])
    fused, fused_grad, reference, reference_grad, weights_only = run_both(logps, old, adv, mask, 16, **kwargs)
    assert_same_result(fused, reference, fused_grad, reference_grad)
    assert_same_result(weights_only, reference)


@pytest.mark.parametrize(
    ("B", "T", "block_size"),
    [(3, 1, 16), (3, 15, 16), (3, 16, 16), (3, 17, 16), (4, 47, 16), (4, 70, 16), (3, 31, 32), (3, 33, 32)],
)
@pytest.mark.parametrize("clip_mode", sorted(CLIP_MODES))
def test_random_shapes_across_block_boundaries(B, T, block_size, clip_mode):
    logps, old, adv, mask = random_batch(B, T, seed=T * 7 + block_size)
    kwargs = hyperparameters(clip_mode)
    fused, fused_grad, reference, reference_grad, weights_only = run_both(logps, old, adv, mask, block_size, **kwargs)
    assert_same_result(fused, reference, fused_grad, reference_grad)
    assert_same_result(weights_only, reference)
    assert not fused.keep[3] if B > 3 else True  # the sequence filter fired


@pytest.mark.parametrize("clip_mode", sorted(CLIP_MODES))
def test_per_token_advantages_and_official_decay(clip_mode):
    logps, old, adv, mask = random_batch(4, 40, seed=11, per_token_adv=True, scale=0.5)
    kwargs = hyperparameters(clip_mode, decay_rate=32.0, safety_threshold=10.0)
    fused, fused_grad, reference, reference_grad, weights_only = run_both(logps, old, adv, mask, 16, **kwargs)
    assert_same_result(fused, reference, fused_grad, reference_grad)
    assert_same_result(weights_only, reference)


@pytest.mark.parametrize("per_token_adv", [False, True], ids=["adv_B", "adv_BT"])
def test_bfloat16_inputs_match_torch_path_and_keep_grad_dtype(per_token_adv):
    logps, old, adv, mask = random_batch(3, 37, seed=5, per_token_adv=per_token_adv)
    logps, old = logps.bfloat16(), old.bfloat16()
    kwargs = hyperparameters("two_sided")
    fused, fused_grad, reference, reference_grad, weights_only = run_both(logps, old, adv, mask, 16, **kwargs)
    assert fused.weights.dtype == torch.float32 and fused.loss.dtype == torch.float32
    assert fused_grad.dtype == torch.bfloat16
    # both paths compute in fp32 from the same bf16 values; compare the fp32 gradient before the bf16 cast
    assert_same_result(fused, reference)
    torch.testing.assert_close(fused_grad.float(), reference_grad.float(), rtol=1e-2, atol=TOL)


def test_infinite_log_probs_and_all_masked_batch():
    logps, old, adv, mask = random_batch(3, 20, seed=3)
    logps[0, 2], logps[0, 5], old[2, 0] = -math.inf, math.inf, -math.inf  # clamped to +-20, zero gradient
    mask[2, 0] = True
    kwargs = hyperparameters("high_only")
    fused, fused_grad, reference, reference_grad, _ = run_both(logps, old, adv, mask, 16, **kwargs)
    assert_same_result(fused, reference, fused_grad, reference_grad)
    empty = torch.zeros_like(mask)
    fused, fused_grad, reference, reference_grad, _ = run_both(logps, old, adv, empty, 16, **kwargs)
    assert_same_result(fused, reference, fused_grad, reference_grad)
    assert fused.loss.item() == 0.0 and math.isinf(fused.stats["min_weight"].item())


def test_empty_batch():
    logps, old, mask = torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool)
    fused = fipo_weights_triton(logps, old, torch.zeros(0), mask, **hyperparameters())
    reference = fipo_loss_torch(logps, old, torch.zeros(0), mask, **hyperparameters())
    assert_same_result(fused, reference)


def test_backward_scales_with_upstream_gradient():
    logps, old, adv, mask = random_batch(3, 24, seed=9)
    leaf = logps.detach().clone().requires_grad_()
    (fipo_loss_triton(leaf, old, adv, mask, block_size=16, **hyperparameters()).loss * 3.0).backward()
    reference_leaf = logps.detach().clone().requires_grad_()
    (fipo_loss_torch(reference_leaf, old, adv, mask, **hyperparameters()).loss * 3.0).backward()
    torch.testing.assert_close(leaf.grad, reference_leaf.grad, rtol=0, atol=TOL)


def test_fipo_loss_dispatch_on_cpu():
    logps, old, adv, mask = random_batch(3, 20, seed=1)
    auto = fipo_loss(logps, old, adv, mask)
    assert auto.backend == "torch"  # CPU tensors never pick the interpreter implicitly
    explicit = fipo_loss(logps, old, adv, mask, backend="triton")
    assert explicit.backend == "triton"
    torch.testing.assert_close(explicit.weights, auto.weights, rtol=0, atol=TOL)
    assert fipo_loss(logps, old, adv, mask, backend="torch").backend == "torch"
    with pytest.raises(ValueError, match="backend"):
        fipo_loss(logps, old, adv, mask, backend="cuda")
    with pytest.raises(TypeError, match="float64"):
        fipo_loss(logps.double(), old.double(), adv.double(), mask, backend="triton")
    assert fipo_loss(logps.double(), old.double(), adv.double(), mask).backend == "torch"


def test_triton_backend_on_cpu_without_interpreter_raises_clearly():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch\n"
        "from fipo_trl import fipo_loss\n"
        "x = torch.zeros(2, 3); m = torch.ones(2, 3, dtype=torch.bool)\n"
        "assert fipo_loss(x, x, torch.ones(2), m).backend == 'torch'\n"
        "try:\n"
        "    fipo_loss(x, x, torch.ones(2), m, backend='triton')\n"
        "except RuntimeError as error:\n"
        "    print('RAISED', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RAISED" in result.stdout and "TRITON_INTERPRET=1" in result.stdout and "backend='torch'" in result.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_torch_path(dtype):
    logps, old, adv, mask = (t.cuda() for t in random_batch(8, 5000, seed=0, scale=0.3))
    logps, old = logps.to(dtype), old.to(dtype)
    kwargs = hyperparameters("high_only", decay_rate=32.0, safety_threshold=10.0)
    auto = fipo_loss(logps, old, adv, mask)
    assert auto.backend == "triton"
    fused, fused_grad, reference, reference_grad, weights_only = run_both(logps, old, adv, mask, None, **kwargs)
    assert_same_result(fused, reference)
    torch.testing.assert_close(fused_grad.float(), reference_grad.float(), rtol=1e-2, atol=TOL)
    assert_same_result(weights_only, reference)
