"""fipo_loss against every official hand-checkable case (SPEC §4, tests/data/official_vectors.json).

The vectors were produced by the official ``compute_policy_loss_future_kl`` and then written to 6 decimals, inputs
included: the old log-probs are round numbers, but the stored log-probs are only known to +-5e-7. Tolerances are
1e-6 (float64) and 1e-5 (float32) plus what that input rounding alone moves each output by, measured by
re-evaluating the float64 reference at random points of the rounding cell. For the short hand-built cases that
allowance is a few 1e-7; for the T = 300 case, where F sums ~46 rounded log-ratios, it reaches ~8e-6. Exactness itself is pinned separately: fipo_loss
equals the float64 reference on the stored inputs to 1e-12.
"""

import json
from pathlib import Path

import pytest
import torch

from fipo_trl import fipo_loss
from fipo_trl.kernels import fipo_loss_naive

VECTORS = json.loads((Path(__file__).parent / "data" / "official_vectors.json").read_text())
SHARED_COPY = Path(__file__).resolve().parents[2] / "shared" / "fipo" / "vectors.json"
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5}


def case_inputs(case, dtype):
    inputs = case["inputs"]
    logps = torch.tensor(inputs["logp"], dtype=dtype, requires_grad=True)
    old = torch.tensor(inputs["old_logp"], dtype=dtype)
    adv = torch.tensor(inputs["adv"], dtype=dtype)
    mask = torch.tensor(inputs["mask"], dtype=dtype)
    return logps, old, adv, mask


def case_kwargs(case):
    h = case["hyperparameters"]
    return dict(decay_rate=h["decay_rate"], clip_ratio=h["fkl_clip_ratio"], clip_high_only=h["clip_high_only"],
                safety_threshold=h["safety_thresh"], dual_clip=h["clip_ratio_c"], epsilon_low=h["eps_low"],
                epsilon_high=h["eps_high"])


def assert_close(actual, expected, tol, what):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    actual = torch.as_tensor(actual).detach().double()
    err = (actual - expected).abs() - tol
    assert err.max().item() <= 0, f"{what}: max abs error exceeds the tolerance by {err.max().item():.3g}"


def rounding_allowance(case, n_samples=16):
    """Per output: how far evaluating the reference in the +-5e-7 rounding cell of the stored log-probs moves it."""
    logps, old, adv, mask = case_inputs(case, torch.float64)
    center = reference_outputs(logps, old, adv, mask, case)
    generator = torch.Generator().manual_seed(0)
    spread = {key: torch.zeros_like(value) for key, value in center.items()}
    shifts = [(torch.rand(logps.shape, generator=generator, dtype=torch.float64) - 0.5) * 1e-6 for _ in range(n_samples)]
    # F is increasing in every log-ratio and exp/clip are monotone: the all-up and all-down corners bound them
    shifts += [torch.full(logps.shape, 5e-7, dtype=torch.float64), torch.full(logps.shape, -5e-7, dtype=torch.float64)]
    for shift in shifts:
        moved = reference_outputs(logps.detach() + shift, old, adv, mask, case)
        for key in spread:
            spread[key] = torch.maximum(spread[key], (moved[key] - center[key]).abs())
    return spread


def reference_outputs(logps, old, adv, mask, case):
    ref = fipo_loss_naive(logps, old, adv, mask, **case_kwargs(case))
    out = fipo_loss(logps.detach(), old, adv, mask, **case_kwargs(case))
    outputs = {key: ref[key] for key in ("loss", "grad_logp", "w", "future_kl")}
    outputs.update({f"metric:{k}": torch.tensor(v, dtype=torch.float64) for k, v in out.metrics.items()})
    return outputs


def test_vendored_vectors_match_shared_ground_truth():
    if not SHARED_COPY.exists():
        pytest.skip("../shared/fipo/vectors.json is not beside this checkout")
    assert json.loads(SHARED_COPY.read_text()) == VECTORS


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", sorted(VECTORS))
def test_fipo_loss_reproduces_official_case(name, dtype):
    case, tol = VECTORS[name], TOLERANCE[dtype]
    expected, allowance = case["outputs"], rounding_allowance(case)
    logps, old, adv, mask = case_inputs(case, dtype)
    out = fipo_loss(logps, old, adv, mask, **case_kwargs(case))
    out.loss.backward()

    assert out.loss.dtype == dtype
    assert_close(out.loss, expected["loss"], tol + allowance["loss"], "loss")
    assert_close(logps.grad, expected["grad_logp"], tol + allowance["grad_logp"], "dL/dlogp")
    assert_close(out.weights, expected["w"], tol + allowance["w"], "weights")
    assert_close(out.future_kl, expected["future_kl"], tol + allowance["future_kl"], "future-KL")
    assert torch.equal(out.keep, torch.tensor(expected["seq_valid"]) > 0)
    for metric, value in expected["metrics"].items():
        assert_close(out.metrics[metric], value, tol + allowance[f"metric:{metric}"], metric)
    assert not out.weights.requires_grad and not out.future_kl.requires_grad


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_fipo_loss_equals_float64_reference_exactly(name):
    """On the stored inputs themselves there is no rounding excuse: the O(T) path equals the sequential
    float64 oracle (which matches the official outputs above) to 1e-12, loss, gradient and every weight."""
    case = VECTORS[name]
    logps, old, adv, mask = case_inputs(case, torch.float64)
    ref = fipo_loss_naive(logps, old, adv, mask, **case_kwargs(case))
    out = fipo_loss(logps, old, adv, mask, **case_kwargs(case))
    out.loss.backward()
    for actual, key in ((out.loss, "loss"), (logps.grad, "grad_logp"), (out.weights, "w"),
                        (out.future_kl, "future_kl"), (out.keep.double(), "seq_valid")):
        assert_close(actual, ref[key], 1e-12, key)
    for key in ("participates", "safety_hit", "n_dual_clipped", "final_mask"):
        assert_close(ref[key], case["outputs"][key], 0, key)  # the discrete decisions match the official ones


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_per_token_advantages_give_the_same_loss(name):
    """(B,) advantages and the same values broadcast to (B, T) are the same problem."""
    case = VECTORS[name]
    logps, old, adv, mask = case_inputs(case, torch.float64)
    per_row = fipo_loss(logps, old, adv, mask, **case_kwargs(case))
    per_token = fipo_loss(logps, old, adv[:, None].expand_as(mask).clone(), mask, **case_kwargs(case))
    assert torch.equal(per_row.loss, per_token.loss) and torch.equal(per_row.weights, per_token.weights)
