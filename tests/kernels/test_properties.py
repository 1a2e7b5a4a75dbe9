"""The functional API (fipo_weights, fipo_loss) beyond the reference values: weights without a loss, the sequence
filter, masked positions, degenerate and bad input, the hyperparameter names and defaults."""

import dataclasses
import inspect
import math
from types import SimpleNamespace

import pytest
import torch
from kernel_utils import BACKENDS, random_batch

from fipo_trl import FIPOLossOutput, FIPOWeights, fipo_loss, fipo_weights
from fipo_trl.kernels import DEFAULTS
from fipo_trl.loss import hyperparameters_from_config

APIS = [pytest.param(fipo_loss, id="fipo_loss"), pytest.param(fipo_weights, id="fipo_weights")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fipo_weights_is_fipo_loss_without_the_loss(backend):
    logps, old, adv, mask = random_batch(4, 40, seed=6)
    leaf = logps.clone().requires_grad_()
    weights = fipo_weights(leaf, old, adv, mask, backend=backend)
    loss = fipo_loss(leaf, old, adv, mask, backend=backend)
    assert type(weights) is FIPOWeights and isinstance(loss, FIPOLossOutput) and not hasattr(weights, "loss")
    for field in ("weights", "weighted_advantages", "future_kl", "keep"):
        assert torch.equal(getattr(weights, field), getattr(loss, field)), field
        assert getattr(weights, field).grad_fn is None, field  # detached: nothing kept for autograd
    assert weights.stats == loss.stats and weights.metrics == loss.metrics and weights.backend == backend
    assert loss.loss.requires_grad


def test_bfloat16_inputs_compute_in_float32():
    logps, old, adv, mask = random_batch(3, 40, seed=3, scale=0.05)
    leaf = logps.bfloat16().requires_grad_()
    out = fipo_loss(leaf, old.bfloat16(), adv, mask)
    out.loss.backward()
    assert out.weights.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert leaf.grad.dtype == torch.bfloat16 and torch.isfinite(leaf.grad.float()).all()
    ref = fipo_loss(leaf.detach().float(), old.bfloat16().float(), adv, mask)
    torch.testing.assert_close(out.weights, ref.weights)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_filter_drops_rows_with_two_dual_clipped_tokens(backend):
    dtype, tol = (torch.float64, 1e-12) if backend == "torch" else (torch.float32, 1e-6)  # the fused paths: fp32
    old = torch.full((3, 4), -5.0, dtype=dtype)
    logps = old.clone()
    logps[0, :2] += 3.0  # A < 0, ratio e^3 = 20 > c twice: dropped
    logps[1, 0] += 3.0  # once: kept
    logps[2, :2] += 3.0  # A > 0: the dual clip only concerns negative advantages, kept
    adv = torch.tensor([-1.0, -1.0, 1.0], dtype=dtype)
    mask = torch.ones(3, 4, dtype=torch.bool)
    out = fipo_loss(logps, old, adv, mask, backend=backend)
    assert out.keep.tolist() == [False, True, True]
    assert out.metrics["dropped_seq_ratio"] == pytest.approx(1 / 3)
    kept_only = fipo_loss(logps[1:], old[1:], adv[1:], mask[1:], backend=backend)
    assert out.loss.item() == pytest.approx(kept_only.loss.item(), abs=tol)  # gone from the denominator too


def test_masked_positions_may_hold_anything():
    logps, old, adv, mask = random_batch(3, 30, seed=4, scale=0.05, dtype=torch.float64)
    clean = fipo_loss(logps.nan_to_num(), old, adv, mask)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_log_probs_at_response_tokens_are_clamped_not_nan(backend):
    """Official semantics: the log-ratio is clamped to [-20, 20], so +-inf gives ratio e^+-20 and zero gradient."""
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    logps = torch.tensor([[float("-inf"), -1.0, float("inf")]], requires_grad=True)
    out = fipo_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 3, dtype=torch.bool), backend=backend)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.weights).all()
    assert logps.grad[0, 0] == 0 and logps.grad[0, 2] == 0 and logps.grad[0, 1] != 0
    assert out.metrics["filtered_ratio"] == pytest.approx(1 / 3)  # ratio e^20 > c leaves the Future-KL


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "logps, old, match",
    [
        ([[float("nan"), -1.0]], [[-1.0, -1.0]], "NaN log-ratio"),
        ([[-1.0, -1.0]], [[float("nan"), -1.0]], "NaN log-ratio"),
        ([[float("inf"), -1.0]], [[float("inf"), -1.0]], "same infinity"),
    ],
)
def test_nan_log_ratio_at_response_token_raises(logps, old, match, backend, api):
    with pytest.raises(ValueError, match=match):
        api(torch.tensor(logps), torch.tensor(old), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool),
            backend=backend)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_advantage_at_response_token_raises(backend, api):
    with pytest.raises(ValueError, match="non-finite advantage"):
        api(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([1.0, float("nan")]), torch.ones(2, 2), backend=backend)
    # ...but not when that response has no token left
    out = api(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([1.0, float("nan")]), torch.tensor([[1, 1], [0, 0]]),
              backend=backend)
    assert torch.isfinite(out.weights).all() and torch.isfinite(getattr(out, "loss", torch.zeros(()))).all()


@pytest.mark.parametrize("api", APIS)
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
        ({"delta": 1.2}, "delta"),
        ({"delta": 1.28}, "delta"),
        ({"epsilon": 1.0}, "epsilon"),
        ({"epsilon_high": -0.1}, "epsilon_high"),
    ],
)
def test_bad_hyperparameters_name_the_field(kwargs, field, api):
    with pytest.raises(ValueError, match=rf"`{field}` = .*Use"):
        api(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), **kwargs)


@pytest.mark.parametrize("api", APIS)
def test_a_hyperparameter_changed_in_place_is_validated_with_its_new_value(api):
    """Validation is cached by value: a one-element tensor that was valid and is then changed in place to an invalid
    value must fail, not pass on the old value."""
    delta = torch.tensor(10.0)
    batch = (torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2))
    assert api(*batch, delta=delta).weights.shape == (1, 2)
    delta.fill_(1.25)  # below 1 + epsilon_high
    with pytest.raises(ValueError, match=r"`delta` = 1.25 is invalid"):
        api(*batch, delta=delta)


@pytest.mark.parametrize("api", APIS)
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
        ((torch.zeros(2, 3), torch.zeros(2, 3).to("meta"), torch.ones(2), torch.ones(2, 3)), ValueError,
         "`old_logps` is a meta tensor"),
        (([[0.0]], torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1)), TypeError, "torch.Tensor"),
    ],
)
def test_bad_tensors_get_clear_errors(args, error, match, api):
    with pytest.raises(error, match=rf"{api.__name__}: .*{match}"):
        api(*args)


def test_official_defaults_are_defined_once():
    """fipo_loss, fipo_weights and FIPOConfig all take their defaults from kernels.common.DEFAULTS."""
    from fipo_trl.config import FIPOConfig

    for api in (fipo_loss, fipo_weights):
        parameters = inspect.signature(api).parameters
        defaults = {name: parameters[name].default for name in DEFAULTS._fields}
        assert defaults == DEFAULTS._asdict(), api.__name__
    config_defaults = {field.name: field.default for field in dataclasses.fields(FIPOConfig)}
    assert hyperparameters_from_config(SimpleNamespace(**config_defaults)) == DEFAULTS._asdict()


def test_config_fields_are_the_functional_names_with_fipo_prefix():
    config = SimpleNamespace(fipo_decay_rate=8.0, fipo_clip_ratio=0.1, fipo_clip_high_only=False,
                             fipo_safety_threshold=3.0, delta=4.0, epsilon=0.3, epsilon_high=None)
    assert hyperparameters_from_config(config) == dict(decay_rate=8.0, clip_ratio=0.1, clip_high_only=False,
                                                       safety_threshold=3.0, delta=4.0, epsilon=0.3,
                                                       epsilon_high=0.3)  # None: TRL uses epsilon
