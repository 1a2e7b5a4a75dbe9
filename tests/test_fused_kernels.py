"""The fused kernels against the torch path: Triton (kernels/fipo_triton.py) on CPU through TRITON_INTERPRET=1, and
the C kernel (kernels/fipo_cpu.c), which ``fipo_loss`` uses on CPU.

The interpreter runs a custom scan as a Python loop, so shapes stay small and the Triton block size is a parameter:
T crosses one or several blocks (just below / at / above the block size) with holes, right padding and empty rows.
The C kernel walks rows in chunks of 256 tokens; its shapes cross that boundary the same way.
"""

import functools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fipo_trl import fipo_loss
from fipo_trl.kernels import fipo_loss_torch, fipo_loss_triton, fipo_weights_triton, triton_usable
from fipo_trl.kernels.fipo_cpu import CHUNK_SIZE, cpu_kernel_status, cpu_kernel_usable, fipo_loss_cpu
from fipo_trl.loss import decay_to_gamma, metrics_from_stats

needs_interpreter = pytest.mark.skipif(not triton_usable(torch.device("cpu")),
                                       reason="needs triton and TRITON_INTERPRET=1 before import (tests/conftest.py)")
needs_c_kernel = pytest.mark.skipif(not cpu_kernel_usable(), reason=f"C kernel unavailable: {cpu_kernel_status()}")
BACKENDS = [pytest.param("triton", marks=needs_interpreter), pytest.param("cpu", marks=needs_c_kernel)]

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
    torch.testing.assert_close(fused.weighted_advantages, reference.weighted_advantages, rtol=TOL, atol=TOL)
    assert abs(fused.loss.item() - reference.loss.item()) <= TOL * max(1.0, abs(reference.loss.item()))
    assert torch.equal(fused.keep, reference.keep)
    if reference_grad is not None:
        torch.testing.assert_close(fused_grad.float(), reference_grad.float(), rtol=0, atol=TOL)
    assert list(fused.stats) == list(reference.stats)
    for key, expected in reference.stats.items():
        actual = fused.stats[key]
        if isinstance(actual, torch.Tensor):  # the Triton path: 0-dim tensors of the torch path's dtype
            assert actual.dtype == expected.dtype and actual.dim() == 0, key
        else:  # the C kernel hands Python floats
            assert isinstance(actual, float), key
        actual, expected = float(actual), float(expected)
        if math.isinf(expected):
            assert actual == expected, key  # the empty-extremum sentinels
        elif key.startswith("n_"):
            assert actual == expected, key
        else:
            assert abs(actual - expected) <= TOL * max(1.0, abs(expected)), key
    metrics, expected_metrics = metrics_from_stats(fused.stats), metrics_from_stats(reference.stats)
    for key, expected in expected_metrics.items():
        torch.testing.assert_close(metrics[key], expected, rtol=TOL, atol=TOL, equal_nan=True)


def fused_paths(backend, block_size):
    """(loss with gradient, weights only) of a fused backend; block_size is the Triton block (the C chunk is fixed)."""
    if backend == "triton":
        return (functools.partial(fipo_loss_triton, block_size=block_size),
                functools.partial(fipo_weights_triton, block_size=block_size))
    return fipo_loss_cpu, fipo_loss_cpu  # without requires_grad it stores no gradient


def run_both(backend, logps, old, adv, mask, block_size, **kwargs):
    """Fused loss (with gradient), fused weights only, and the torch path on the same inputs."""
    loss_path, weights_path = fused_paths(backend, block_size)
    fused_leaf = logps.detach().clone().requires_grad_()
    torch_leaf = logps.detach().clone().requires_grad_()
    fused = loss_path(fused_leaf, old, adv, mask, **kwargs)
    reference = fipo_loss_torch(torch_leaf, old, adv, mask, **kwargs)
    fused.loss.backward()
    reference.loss.backward()
    weights_only = weights_path(logps, old, adv, mask, **kwargs)
    return fused, fused_leaf.grad, reference, torch_leaf.grad, weights_only


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(VECTORS))
def test_official_vectors_match_torch_path(name, backend):
    case = VECTORS[name]
    inputs, h = case["inputs"], case["hyperparameters"]
    logps, old, adv = (torch.tensor(inputs[k], dtype=torch.float32) for k in ("logp", "old_logp", "adv"))
    mask = torch.tensor(inputs["mask"]) != 0
    kwargs = dict(gamma=decay_to_gamma(h["decay_rate"]), clip_ratio=h["fkl_clip_ratio"],
                  clip_high_only=h["clip_high_only"], safety_threshold=h["safety_thresh"], dual_clip=h["clip_ratio_c"],
                  epsilon_low=h["eps_low"], epsilon_high=h["eps_high"])
    fused, fused_grad, reference, reference_grad, weights_only = run_both(backend, logps, old, adv, mask, 16, **kwargs)
    assert_same_result(fused, reference, fused_grad, reference_grad)
    assert_same_result(weights_only, reference)


# (B, T, Triton block size): T just below / at / above one block, several blocks; for the C kernel the same around
# its 256-token chunk.
TRITON_SHAPES = [(3, 1, 16), (3, 15, 16), (3, 16, 16), (3, 17, 16), (4, 47, 16), (4, 70, 16), (3, 31, 32), (3, 33, 32)]
C_SHAPES = [(3, 1, None), (3, CHUNK_SIZE - 1, None), (3, CHUNK_SIZE, None), (3, CHUNK_SIZE + 1, None),
            (4, 3 * CHUNK_SIZE + 7, None), (5, 2 * CHUNK_SIZE, None)]
SHAPES = ([pytest.param("triton", *shape, marks=needs_interpreter) for shape in TRITON_SHAPES]
          + [pytest.param("cpu", *shape, marks=needs_c_kernel) for shape in C_SHAPES])


@pytest.mark.parametrize(("backend", "B", "T", "block_size"), SHAPES)
@pytest.mark.parametrize("clip_mode", sorted(CLIP_MODES))
def test_random_shapes_across_block_boundaries(backend, B, T, block_size, clip_mode):
    logps, old, adv, mask = random_batch(B, T, seed=T * 7 + (block_size or 0))
    kwargs = hyperparameters(clip_mode)
    fused, fused_grad, reference, reference_grad, weights_only = run_both(
        backend, logps, old, adv, mask, block_size, **kwargs)
    assert_same_result(fused, reference, fused_grad, reference_grad)
    assert_same_result(weights_only, reference)
    assert not fused.keep[3] if B > 3 else True  # the sequence filter fired


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip_mode", sorted(CLIP_MODES))
def test_per_token_advantages_and_official_decay(clip_mode, backend):
    logps, old, adv, mask = random_batch(4, 40 if backend == "triton" else 600, seed=11, per_token_adv=True, scale=0.5)
    kwargs = hyperparameters(clip_mode, decay_rate=32.0, safety_threshold=10.0)
    fused, fused_grad, reference, reference_grad, weights_only = run_both(backend, logps, old, adv, mask, 16, **kwargs)
    assert_same_result(fused, reference, fused_grad, reference_grad)
    assert_same_result(weights_only, reference)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_token_adv", [False, True], ids=["adv_B", "adv_BT"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_match_torch_path_and_keep_grad_dtype(per_token_adv, backend, dtype):
    logps, old, adv, mask = random_batch(3, 37, seed=5, per_token_adv=per_token_adv)
    logps, old = logps.to(dtype), old.to(dtype)
    kwargs = hyperparameters("two_sided")
    fused, fused_grad, reference, reference_grad, weights_only = run_both(backend, logps, old, adv, mask, 16, **kwargs)
    assert fused.weights.dtype == torch.float32 and fused.loss.dtype == torch.float32
    assert fused_grad.dtype == dtype
    # both paths compute in fp32 from the same half-precision values; compare before the cast back
    assert_same_result(fused, reference)
    torch.testing.assert_close(fused_grad.float(), reference_grad.float(), rtol=1e-2, atol=TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_log_probs_and_all_masked_batch(backend):
    logps, old, adv, mask = random_batch(3, 20, seed=3)
    logps[0, 2], logps[0, 5], old[2, 0] = -math.inf, math.inf, -math.inf  # clamped to +-20, zero gradient
    mask[2, 0] = True
    kwargs = hyperparameters("high_only")
    fused, fused_grad, reference, reference_grad, _ = run_both(backend, logps, old, adv, mask, 16, **kwargs)
    assert_same_result(fused, reference, fused_grad, reference_grad)
    empty = torch.zeros_like(mask)
    fused, fused_grad, reference, reference_grad, _ = run_both(backend, logps, old, adv, empty, 16, **kwargs)
    assert_same_result(fused, reference, fused_grad, reference_grad)
    assert fused.loss.item() == 0.0 and math.isinf(float(fused.stats["min_weight"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    logps, old, mask = torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool)
    fused = fused_paths(backend, None)[1](logps, old, torch.zeros(0), mask, **hyperparameters())
    reference = fipo_loss_torch(logps, old, torch.zeros(0), mask, **hyperparameters())
    assert_same_result(fused, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_scales_with_upstream_gradient(backend):
    logps, old, adv, mask = random_batch(3, 24, seed=9)
    leaf = logps.detach().clone().requires_grad_()
    (fused_paths(backend, 16)[0](leaf, old, adv, mask, **hyperparameters()).loss * 3.0).backward()
    reference_leaf = logps.detach().clone().requires_grad_()
    (fipo_loss_torch(reference_leaf, old, adv, mask, **hyperparameters()).loss * 3.0).backward()
    torch.testing.assert_close(leaf.grad, reference_leaf.grad, rtol=0, atol=TOL)


def test_fipo_loss_dispatch_on_cpu():
    logps, old, adv, mask = random_batch(3, 20, seed=1)
    auto = fipo_loss(logps, old, adv, mask)
    assert auto.backend == ("cpu" if cpu_kernel_usable() else "torch")  # never the interpreter implicitly
    reference = fipo_loss(logps, old, adv, mask, backend="torch")
    assert reference.backend == "torch"
    torch.testing.assert_close(auto.weights, reference.weights, rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="backend"):
        fipo_loss(logps, old, adv, mask, backend="cuda")
    assert fipo_loss(logps.double(), old.double(), adv.double(), mask).backend == "torch"  # the reference dtype


@needs_interpreter
def test_explicit_triton_backend_on_cpu_under_the_interpreter():
    logps, old, adv, mask = random_batch(3, 20, seed=1)
    explicit = fipo_loss(logps, old, adv, mask, backend="triton")
    assert explicit.backend == "triton"
    torch.testing.assert_close(explicit.weights, fipo_loss(logps, old, adv, mask, backend="torch").weights,
                               rtol=0, atol=TOL)
    with pytest.raises(TypeError, match="float64"):
        fipo_loss(logps.double(), old.double(), adv.double(), mask, backend="triton")


@needs_c_kernel
def test_c_kernel_rejects_float64_and_reports_bad_inputs_itself():
    logps, old, adv, mask = random_batch(3, 20, seed=1)
    with pytest.raises(TypeError, match="float64"):
        fipo_loss(logps.double(), old.double(), adv.double(), mask, backend="cpu")
    bad = logps.clone()
    bad[0, 0] = math.nan  # row 0 is fully on the response
    with pytest.raises(ValueError, match="1 unmasked token.*NaN log-ratio"):
        fipo_loss(bad, old, adv, mask, backend="cpu")
    bad_adv = adv.clone()
    bad_adv[0] = math.inf
    with pytest.raises(ValueError, match=f"{int(mask[0].sum())} unmasked token.*non-finite advantage"):
        fipo_loss(logps, old, bad_adv, mask, backend="cpu")


def run_python(code, **env_overrides):
    env = dict(os.environ, **env_overrides)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


REPORT_BACKEND = (
    "import torch\n"
    "from fipo_trl import fipo_loss\n"
    "from fipo_trl.kernels.fipo_cpu import cpu_kernel_status\n"
    "x = torch.zeros(2, 3); m = torch.ones(2, 3, dtype=torch.bool)\n"
    "print('BACKEND', fipo_loss(x, x, torch.ones(2), m).backend)\n"
    "print('STATUS', cpu_kernel_status())\n"
    "try:\n"
    "    fipo_loss(x, x, torch.ones(2), m, backend='cpu')\n"
    "except RuntimeError as error:\n"
    "    print('RAISED', error)\n"
)


@needs_c_kernel
def test_c_kernel_builds_once_into_the_cache_even_when_processes_race(tmp_path):
    """Two processes build into an empty cache at once (as DDP ranks do): both load it, one file is left, and a
    third process loads that file without compiling."""
    env = dict(os.environ, FIPO_TRL_CACHE=str(tmp_path))
    racers = [subprocess.Popen([sys.executable, "-c", REPORT_BACKEND], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [racer.communicate(timeout=120) for racer in racers]
    for racer, (stdout, stderr) in zip(racers, outputs):
        assert racer.returncode == 0, stderr[-2000:]
        assert "BACKEND cpu" in stdout and "RAISED" not in stdout
    built = list(tmp_path.glob("fipo_cpu_*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("tmp*"))  # no temporary left behind
    mtime = built[0].stat().st_mtime_ns
    assert f"at {built[0]}" in run_python(REPORT_BACKEND, FIPO_TRL_CACHE=str(tmp_path))
    assert built[0].stat().st_mtime_ns == mtime


@pytest.mark.parametrize(("env", "reason"), [({"FIPO_TRL_CPU_KERNEL": "0"}, "disabled by FIPO_TRL_CPU_KERNEL=0"),
                                             ({"CC": "/nonexistent/cc"}, "no C compiler found"),
                                             ({"CC": shutil.which("false") or "/bin/false"}, "failed")])
def test_without_the_c_kernel_cpu_falls_back_to_the_torch_path(tmp_path, env, reason):
    stdout = run_python(REPORT_BACKEND, FIPO_TRL_CACHE=str(tmp_path), **env)
    assert "BACKEND torch" in stdout and reason in stdout
    assert "RAISED" in stdout and "backend='torch'" in stdout  # an explicit backend='cpu' says why and what to do
    assert not list(tmp_path.glob("*.so"))


def test_triton_backend_on_cpu_without_interpreter_raises_clearly():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch\n"
        "from fipo_trl import fipo_loss\n"
        "x = torch.zeros(2, 3); m = torch.ones(2, 3, dtype=torch.bool)\n"
        "assert fipo_loss(x, x, torch.ones(2), m).backend != 'triton'\n"
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
    fused, fused_grad, reference, reference_grad, weights_only = run_both("triton", logps, old, adv, mask, None,
                                                                          **kwargs)
    assert_same_result(fused, reference)
    torch.testing.assert_close(fused_grad.float(), reference_grad.float(), rtol=1e-2, atol=TOL)
    assert_same_result(weights_only, reference)
