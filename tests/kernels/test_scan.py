"""The Future-KL's discounted reverse scan (docs/algorithm.md §1.3): the torch path's blocked scan (kernels/scan.py)
and the official chunked decay-matrix evaluation (naive.future_kl_chunked) against the sequential recursion."""

import pytest
import torch

from fipo_trl.kernels.common import decay_to_gamma
from fipo_trl.kernels.naive import discounted_reverse_cumsum_naive, future_kl_chunked
from fipo_trl.kernels.scan import SCAN_BLOCK_SIZE, discounted_reverse_cumsum

# T around one and several blocks, and past SCAN_BLOCK_SIZE^2 (the scan over block carries recurses once more)
LENGTHS = [1, 2, SCAN_BLOCK_SIZE - 1, SCAN_BLOCK_SIZE, SCAN_BLOCK_SIZE + 1, 200, SCAN_BLOCK_SIZE**2 + 1]
GAMMAS = [0.5, decay_to_gamma(32.0), 0.999]


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_blocked_scan_matches_sequential_recursion(T, gamma):
    x = torch.randn(3, T, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
    expected = discounted_reverse_cumsum_naive(x, gamma)
    torch.testing.assert_close(discounted_reverse_cumsum(x, gamma), expected, rtol=0, atol=1e-12)
    # float32: each output sums up to 1 / (1 - gamma) = 1000 terms of |x| ~ 1, every factor gamma^d <= 1
    torch.testing.assert_close(discounted_reverse_cumsum(x.float(), gamma).double(), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("T", [1, 127, 128, 129, 300])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_official_chunked_evaluation_is_the_same_sum(T, gamma):
    x = torch.randn(2, T, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
    torch.testing.assert_close(future_kl_chunked(x, gamma), discounted_reverse_cumsum_naive(x, gamma), rtol=0,
                               atol=1e-12)


def test_official_chunked_evaluation_carries_autograd():
    """What makes the official code's memory grow with T x chunk: F keeps the graph of its decay products."""
    x = torch.randn(2, 300, dtype=torch.float64, requires_grad=True)
    future_kl_chunked(x, 0.9).sum().backward()
    # d sum_t F_t / d x_j = sum_{t <= j} gamma^(j - t)
    expected = discounted_reverse_cumsum_naive(torch.ones(1, 300), 0.9).flip(-1).expand(2, 300)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-12)
