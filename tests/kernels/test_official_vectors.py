"""Every compute path against every official hand-checkable case (data/official_vectors.json; docs/algorithm.md §1).

The vectors were produced by the official ``compute_policy_loss_future_kl`` and then written to 6 decimals, inputs
included: the old log-probs are round numbers, but the stored log-probs are only known to +-5e-7. Tolerances are
1e-6 (float64) and 1e-5 (float32) plus what that input rounding alone moves each output by, measured by
re-evaluating the float64 reference at random points of the rounding cell. For the short hand-built cases that
allowance is a few 1e-7; for the T = 300 case, where F sums ~46 rounded log-ratios, it reaches ~8e-6. Exactness
itself is pinned separately: on the stored inputs every path equals the float64 reference (kernels/naive.py) to the
tolerances of tests/kernels/kernel_utils.py, and the reference's discrete decisions equal the official ones.
"""

import json
from pathlib import Path

import pytest
import torch
from kernel_utils import BACKEND_MARKS, WITH_LOSS, assert_matches_reference, run_path

from fipo_trl import fipo_loss
from fipo_trl.kernels import Hyperparameters
from fipo_trl.kernels.naive import fipo_loss_naive
from fipo_trl.loss import metrics_from_stats

VECTORS = json.loads((Path(__file__).parent / "data" / "official_vectors.json").read_text())
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5}
PATHS = [pytest.param(backend, dtype, id=f"{backend}-{str(dtype)[6:]}", marks=BACKEND_MARKS[backend])
         for backend, dtype in (("torch", torch.float64), ("torch", torch.float32), ("c", torch.float32),
                                ("triton", torch.float32))]


def case_inputs(case, dtype):
    inputs = case["inputs"]
    logps = torch.tensor(inputs["logp"], dtype=dtype, requires_grad=True)
    old = torch.tensor(inputs["old_logp"], dtype=dtype)
    adv = torch.tensor(inputs["adv"], dtype=dtype)
    mask = torch.tensor(inputs["mask"], dtype=dtype)
    return logps, old, adv, mask


def case_hyperparameters(case) -> Hyperparameters:
    """The official names (verl's) of a case's hyperparameters, in TRL's names."""
    h = case["hyperparameters"]
    return Hyperparameters(decay_rate=h["decay_rate"], clip_ratio=h["fkl_clip_ratio"],
                           clip_high_only=h["clip_high_only"], safety_threshold=h["safety_thresh"],
                           delta=h["clip_ratio_c"], epsilon=h["eps_low"], epsilon_high=h["eps_high"])


def assert_close(actual, expected, tol, what):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    actual = torch.as_tensor(actual).detach().double()
    err = (actual - expected).abs() - tol
    assert err.max().item() <= 0, f"{what}: max abs error exceeds the tolerance by {err.max().item():.3g}"


def reference_outputs(logps, old, adv, mask, case):
    ref = fipo_loss_naive(logps, old, adv, mask, **case_hyperparameters(case)._asdict())
    outputs = {key: ref[key] for key in ("loss", "grad_logp", "w", "future_kl")}
    outputs.update({f"metric:{k}": torch.tensor(v, dtype=torch.float64)
                    for k, v in metrics_from_stats(ref["stats"]).items()})
    return outputs


def rounding_allowance(case, n_samples=16):
    """Per output: how far evaluating the reference in the +-5e-7 rounding cell of the stored log-probs moves it."""
    logps, old, adv, mask = case_inputs(case, torch.float64)
    center = reference_outputs(logps, old, adv, mask, case)
    generator = torch.Generator().manual_seed(0)
    spread = {key: torch.zeros_like(value) for key, value in center.items()}
    shifts = [(torch.rand(logps.shape, generator=generator, dtype=torch.float64) - 0.5) * 1e-6
              for _ in range(n_samples)]
    # F is increasing in every log-ratio and exp/clip are monotone: the all-up and all-down corners bound them
    shifts += [torch.full(logps.shape, 5e-7, dtype=torch.float64), torch.full(logps.shape, -5e-7, dtype=torch.float64)]
    for shift in shifts:
        moved = reference_outputs(logps.detach() + shift, old, adv, mask, case)
        for key in spread:
            spread[key] = torch.maximum(spread[key], (moved[key] - center[key]).abs())
    return spread


@pytest.mark.parametrize(("backend", "dtype"), PATHS)
@pytest.mark.parametrize("name", sorted(VECTORS))
def test_every_path_reproduces_the_official_case(name, backend, dtype):
    case, tol = VECTORS[name], TOLERANCE[dtype]
    expected, allowance = case["outputs"], rounding_allowance(case)
    logps, old, adv, mask = case_inputs(case, dtype)
    out = fipo_loss(logps, old, adv, mask, backend=backend, **case_hyperparameters(case)._asdict())
    out.loss.backward()

    assert out.backend == backend and out.loss.dtype == dtype
    assert_close(out.loss, expected["loss"], tol + allowance["loss"], "loss")
    assert_close(logps.grad, expected["grad_logp"], tol + allowance["grad_logp"], "dL/dlogp")
    assert_close(out.weights, expected["w"], tol + allowance["w"], "weights")
    assert_close(out.future_kl, expected["future_kl"], tol + allowance["future_kl"], "future-KL")
    assert torch.equal(out.keep, torch.tensor(expected["seq_valid"]) > 0)
    for metric, value in expected["metrics"].items():
        assert_close(out.metrics[metric], value, tol + allowance[f"metric:{metric}"], metric)
    assert not out.weights.requires_grad and not out.future_kl.requires_grad


@pytest.mark.parametrize("with_loss", WITH_LOSS)
@pytest.mark.parametrize(("backend", "dtype"), PATHS)
@pytest.mark.parametrize("name", sorted(VECTORS))
def test_every_path_equals_the_reference_on_the_stored_inputs(name, backend, dtype, with_loss):
    """On the stored inputs themselves there is no rounding excuse: each path equals the float64 reference (which
    matches the official outputs above) to the tolerances of kernel_utils (1e-12 in float64)."""
    case = VECTORS[name]
    logps, old, adv, mask = case_inputs(case, dtype)
    h = case_hyperparameters(case)
    out, grad = run_path(backend, logps, old, adv, mask > 0, h, with_loss=with_loss, block_size=16)
    assert_matches_reference(out, fipo_loss_naive(logps, old, adv, mask, **h._asdict()), dtype, grad)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_reference_decisions_are_the_official_ones(name):
    case, allowance = VECTORS[name], rounding_allowance(VECTORS[name])
    ref = fipo_loss_naive(*case_inputs(case, torch.float64), **case_hyperparameters(case)._asdict())
    for key in ("participates", "safety_hit", "n_dual_clipped", "final_mask", "seq_valid"):
        assert_close(ref[key], case["outputs"][key], 0, key)  # the discrete decisions match the official ones
    for key in ("loss", "grad_logp", "w", "future_kl"):
        assert_close(ref[key], case["outputs"][key], 1e-6 + allowance[key], key)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_per_token_advantages_give_the_same_loss(name):
    """(B,) advantages and the same values broadcast to (B, T) are the same problem."""
    case = VECTORS[name]
    logps, old, adv, mask = case_inputs(case, torch.float64)
    h = case_hyperparameters(case)._asdict()
    per_row = fipo_loss(logps, old, adv, mask, **h)
    per_token = fipo_loss(logps, old, adv[:, None].expand_as(mask).clone(), mask, **h)
    assert torch.equal(per_row.loss, per_token.loss) and torch.equal(per_row.weights, per_token.weights)
