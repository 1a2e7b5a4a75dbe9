"""The Future-KL's discounted reverse scan in torch: y_t = sum_{j >= t} gamma^(j - t) x_j (docs/algorithm.md §1.3).

The official code builds it from chunked decay-matrix products (``naive.future_kl_chunked``), which keeps T x chunk
buffers alive when the log-ratio carries autograd. Here it is a blocked scan: a fixed (K x K) decay matrix inside
blocks of K tokens, and the same scan, recursively, over the block carries. Memory is O(B * T), work O(B * T * K),
every factor is gamma^d <= 1 (no gamma^(-t) rescaling, so nothing overflows at T = 32K), and it is exact up to float
rounding. The sequential recursion it is tested against is ``naive.discounted_reverse_cumsum_naive``; the fused C
and Triton kernels run the same recursion in their own row loops.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

SCAN_BLOCK_SIZE = 64


@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device):
    """TF32 would cost ~1e-3 relative error in F; keep fp32 matmuls exact on CUDA (no-op elsewhere)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@functools.lru_cache(maxsize=32)
def _scan_factors(gamma: float, K: int, dtype: torch.dtype, device: torch.device):
    """(K, K) decay matrix [j, i] = gamma^(j - i) for j >= i, and gamma^(K - i): the reach of the next block."""
    offsets = torch.arange(K, dtype=torch.float64)
    distance = offsets[:, None] - offsets[None, :]
    decay = torch.where(distance >= 0, gamma ** distance.clamp(min=0), 0.0)
    to_next_block = gamma ** (K - offsets)
    return decay.to(dtype=dtype, device=device), to_next_block.to(dtype=dtype, device=device)


def discounted_reverse_cumsum(x: torch.Tensor, gamma: float, block_size: int = SCAN_BLOCK_SIZE) -> torch.Tensor:
    """y[..., t] = sum_{j >= t} gamma^(j - t) * x[..., j] along the last dimension, in x's dtype.

    Blocked scan: y inside block m at offset i is the block-local sum plus gamma^(K - i) times y at the start of
    block m + 1, and the block starts themselves satisfy the same recursion with decay gamma^K.
    """
    T = x.shape[-1]
    if T <= 1:
        return x.clone()
    K = min(block_size, T)
    n_blocks = -(-T // K)
    padded = x if n_blocks * K == T else F.pad(x, (0, n_blocks * K - T))
    blocks = padded.reshape(-1, K)
    decay, to_next_block = _scan_factors(float(gamma), K, x.dtype, x.device)
    with _ieee_fp32_matmul(x.device):
        if n_blocks == 1:
            y = blocks @ decay  # y[r, i] = sum_{j >= i in the block} gamma^(j - i) x_j
        else:
            block_start = (blocks @ decay[:, 0]).reshape(*x.shape[:-1], n_blocks)  # local sum at each block start
            at_block_start = discounted_reverse_cumsum(block_start, gamma**K, block_size)
            carry = F.pad(at_block_start[..., 1:], (0, 1)).reshape(-1)  # y at the first token of the next block
            y = (blocks @ decay).addr_(carry, to_next_block)
    y = y.reshape(*x.shape[:-1], n_blocks * K)
    return y if n_blocks * K == T else y[..., :T]


__all__ = ["SCAN_BLOCK_SIZE", "discounted_reverse_cumsum"]
