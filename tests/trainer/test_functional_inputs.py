"""fipo_loss / fipo_weights with masks that are not 0/1 and with meta tensors: clear errors, not wrong numbers."""

import math

import pytest
import torch

from fipo_trl import fipo_loss, fipo_weights


def batch(B=2, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g) - 0.1
    return logps, logps - 0.05 * torch.randn(B, T, generator=g), torch.tensor([1.0, -1.0][:B]), torch.ones(B, T)


@pytest.mark.parametrize("api", [fipo_loss, fipo_weights])
@pytest.mark.parametrize("bad", [0.5, -1.0, math.nan, 2.0])
def test_a_mask_that_is_not_0_or_1_is_refused(api, bad):
    """0.5, -1 and NaN were read as 1."""
    logps, old, adv, mask = batch()
    mask[1, 3] = bad
    with pytest.raises(ValueError, match=rf"{api.__name__}: `mask` must hold only 0 and 1 .* 1 entries are not, "
                                         rf"e\.g\. {bad!r}.*Fix"):
        api(logps, old, adv, mask, backend="torch")


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64, torch.float32, torch.bfloat16])
def test_bool_and_0_1_masks_of_any_dtype_give_one_result(dtype):
    logps, old, adv, mask = batch()
    mask[0, 4:] = 0
    expected = fipo_loss(logps, old, adv, mask.bool(), backend="torch")
    result = fipo_loss(logps, old, adv, mask.to(dtype), backend="torch")
    assert torch.equal(result.weights, expected.weights) and torch.equal(result.loss, expected.loss)


@pytest.mark.parametrize("api", [fipo_loss, fipo_weights])
@pytest.mark.parametrize("arg", range(4))
def test_meta_tensors_are_named(api, arg):
    """They gave "Tensor.item() cannot be called on meta tensors" from deep inside."""
    with pytest.raises(ValueError, match=rf"{api.__name__}: `logps` is a meta tensor .*Fix"):
        api(*[t.to("meta") for t in batch()])  # all on meta: the device check cannot catch it
    inputs = list(batch())
    inputs[arg] = inputs[arg].to("meta")
    name = ("logps", "old_logps", "advantages", "mask")[arg]
    with pytest.raises(ValueError, match=rf"{api.__name__}: `{name}` is a meta tensor"):
        api(*inputs)


def test_a_meta_hyperparameter_is_named():
    with pytest.raises(ValueError, match="`delta` = .* it must be a number"):
        fipo_loss(*batch(), delta=torch.tensor(10.0, device="meta"))
