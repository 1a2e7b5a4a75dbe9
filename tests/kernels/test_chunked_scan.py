"""The Triton path's chunk variant (one program per (row, chunk): chunk totals, a carry scan over chunks, the fused
pass from each chunk's carry, then the rows' sequence filter) directly against the float64 reference, under the
interpreter; and the rule that picks it (``fipo_triton.choose_variant``).

Chunks and blocks are tiny here (16-32 tokens, the GPU's are 256-1024) so that rows cross many chunk boundaries
cheaply: a chunk's carry, the per-chunk partial stats (sums, minima and maxima over chunks), the dual-clip count
that decides a row only once all its chunks are in, and rows whose chunks are all padding or all masked. The
tolerances are kernel_utils' (float32 against float64: 1e-5 relative to max(1, |value|), counts exact); the chunk
variant sums F in another order than the row variant (a chunk's discounted total, then gamma^CHUNK steps), which
stays within the same few-ulp-per-term budget.
"""

import pytest
import torch
from kernel_utils import (
    CLIP_MODES,
    WITH_LOSS,
    assert_matches_reference,
    hyperparameters,
    needs_interpreter,
    random_batch,
    reference,
)

from fipo_trl.kernels import fipo_triton
from fipo_trl.kernels.fipo_triton import (
    CHUNK_SIZES,
    CHUNKED_MIN_ROW_LENGTH,
    TARGET_PROGRAMS_PER_SM,
    choose_variant,
    chunk_size_for,
    compute_triton,
)


def run_chunked(logps, old, adv, mask, h, *, with_loss=True, chunk_size=32, block_size=16):
    """The chunk variant on a fresh leaf; returns (result, d loss / d logps or None)."""
    leaf = logps.detach().clone().requires_grad_(with_loss)
    result = compute_triton(leaf, old, adv, mask, h, with_loss=with_loss, variant="chunk", chunk_size=chunk_size,
                            block_size=block_size)
    if not with_loss:
        assert result.loss is None
        return result, None
    result.loss.backward()
    return result, leaf.grad


# (B, T, chunk, block): T inside one chunk, at and just past a chunk, many chunks with a partial last one; one block
# per chunk (as on the GPU) and two blocks per chunk
SHAPES = [(3, 5, 16, 16), (3, 16, 16, 16), (3, 17, 16, 16), (5, 70, 16, 16), (4, 95, 32, 16), (4, 64, 32, 16)]


@needs_interpreter
@pytest.mark.parametrize("with_loss", WITH_LOSS)
@pytest.mark.parametrize(("B", "T", "chunk", "block"), SHAPES)
@pytest.mark.parametrize("clip_mode", sorted(CLIP_MODES))
def test_chunk_variant_matches_the_reference(B, T, chunk, block, clip_mode, with_loss):
    """Holes, right padding, a full row, an empty row and (B > 3) a row the sequence filter drops, whose two
    dual-clipped tokens lie in its first chunk while the row's other chunks see none."""
    logps, old, adv, mask = random_batch(B, T, seed=T * 3 + chunk)
    h = hyperparameters(clip_mode)
    out, grad = run_chunked(logps, old, adv, mask, h, with_loss=with_loss, chunk_size=chunk, block_size=block)
    assert_matches_reference(out, reference(logps, old, adv, mask, h), torch.float32, grad)
    if B > 3:
        assert not out.keep[3]


@needs_interpreter
@pytest.mark.parametrize("with_loss", WITH_LOSS)
@pytest.mark.parametrize("clip_mode", sorted(CLIP_MODES))
def test_dual_clipped_tokens_in_different_chunks_drop_the_row(clip_mode, with_loss):
    """One dual-clipped token in each of two chunks: neither chunk alone would drop the row, their sum must."""
    logps, old, adv, mask = random_batch(3, 48, seed=4, drop_row=False)
    mask[2] = True
    adv[2] = -1.0
    logps[2] = old[2]  # ratio 1 everywhere in row 2 ...
    logps[2, 5], logps[2, 40] = old[2, 5] + 3.0, old[2, 40] + 3.0  # ... but two tokens at e^3 > delta, chunks 0, 2
    h = hyperparameters(clip_mode)
    out, grad = run_chunked(logps, old, adv, mask, h, with_loss=with_loss, chunk_size=16, block_size=16)
    ref = reference(logps, old, adv, mask, h)
    assert ref["seq_valid"][2] == 0 and not out.keep[2]
    assert_matches_reference(out, ref, torch.float32, grad)


@needs_interpreter
@pytest.mark.parametrize("decay_rate", [1.0, 32.0, 1e4])
def test_carry_across_many_chunks_and_carry_blocks(monkeypatch, decay_rate):
    """More chunks than one block of the carry scan (forced to 16 chunks here, 1024 on the GPU): the carry crosses
    chunk and carry-block boundaries. A steep decay (gamma = 1/2, gamma^16 ~ 1.5e-5), the official one, and a
    nearly flat one (tau = 1e4: F sums the whole row, every chunk's total reaches every earlier chunk)."""
    monkeypatch.setattr(fipo_triton, "MAX_CARRY_BLOCK_SIZE", 16)
    logps, old, adv, mask = random_batch(3, 16 * 37 + 5, seed=7, scale=0.3, per_token_adv=True)
    h = hyperparameters("uncapped", decay_rate=decay_rate, safety_threshold=10.0)
    out, grad = run_chunked(logps, old, adv, mask, h, chunk_size=16, block_size=16)
    assert_matches_reference(out, reference(logps, old, adv, mask, h), torch.float32, grad)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    logps, old, adv, mask = random_batch(4, 50, seed=5)
    logps, old = logps.to(dtype), old.to(dtype)
    h = hyperparameters("two_sided")
    out, grad = run_chunked(logps, old, adv, mask, h, chunk_size=16)
    assert grad.dtype == dtype and out.weights.dtype == torch.float32
    assert_matches_reference(out, reference(logps, old, adv, mask, h), torch.float32, grad)


@needs_interpreter
@pytest.mark.parametrize("with_loss", WITH_LOSS)
@pytest.mark.parametrize(("B", "T"), [(2, 0), (3, 1)])
def test_degenerate_shapes(B, T, with_loss):
    logps, old, adv, mask = random_batch(B, T, seed=1) if T else (torch.zeros(B, T), torch.zeros(B, T),
                                                                  torch.zeros(B), torch.zeros(B, T, dtype=torch.bool))
    h = hyperparameters()
    out, grad = run_chunked(logps, old, adv, mask, h, with_loss=with_loss, chunk_size=16)
    assert_matches_reference(out, reference(logps, old, adv, mask, h), torch.float32, grad)


@needs_interpreter
def test_chunk_size_must_be_a_multiple_of_the_block_and_the_variant_known():
    logps, old, adv, mask = random_batch(3, 20, seed=1)
    with pytest.raises(ValueError, match="multiple of block_size"):
        compute_triton(logps, old, adv, mask, hyperparameters(), variant="chunk", chunk_size=48, block_size=32)
    with pytest.raises(ValueError, match="variant"):
        compute_triton(logps, old, adv, mask, hyperparameters(), variant="chunks")


# --- the dispatch rule -----------------------------------------------------------------------------------------------

H100_SMS = 132


@pytest.mark.parametrize(("B", "T", "expected"), [
    (8, 1 << 20, "chunk"),  # 8 rows of 1M tokens: 8 of 132 SMs busy otherwise
    (8, CHUNKED_MIN_ROW_LENGTH, "chunk"),
    (8, CHUNKED_MIN_ROW_LENGTH - 1, "row"),  # short rows: the row kernel's few blocks beat three more launches
    (H100_SMS - 1, 1 << 15, "chunk"),
    (H100_SMS, 1 << 15, "row"),  # every SM has a row already
    (512, 16384, "row"),
])
def test_choose_variant(B, T, expected):
    assert choose_variant(B, T, H100_SMS) == expected


def test_choose_variant_without_multiprocessors_is_the_row_kernel():
    """The CPU interpreter has no multiprocessors to fill: "auto" never picks the chunk variant there."""
    assert choose_variant(1, 1 << 20, None) == "row"


@pytest.mark.skipif(not fipo_triton.TRITON_AVAILABLE, reason="needs triton")
def test_chunk_size_fills_the_multiprocessors():
    # B = 8, T = 1M: 1024-token chunks give 8192 programs, >= 4 per SM
    assert chunk_size_for(8, 1 << 20, H100_SMS) == CHUNK_SIZES[0]
    # B = 8, T = 64K: 512 programs of 1024 < 4 x 132 = 528, 1024 of 512 tokens is enough
    assert chunk_size_for(8, 1 << 16, H100_SMS) == 512
    # too few tokens for 4 programs per SM at any size: the smallest chunk
    assert chunk_size_for(8, CHUNKED_MIN_ROW_LENGTH, H100_SMS) == CHUNK_SIZES[-1]
    for B, T in [(1, 1 << 14), (4, 1 << 17), (64, 1 << 15)]:
        chunk = chunk_size_for(B, T, H100_SMS)
        assert chunk == CHUNK_SIZES[-1] or B * -(-T // chunk) >= TARGET_PROGRAMS_PER_SM * H100_SMS


class LaunchSpy:
    """Stands in for a jit kernel: counts launches, then launches the real one."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@needs_interpreter
def test_auto_runs_the_row_kernel_on_cpu_and_the_variant_can_be_forced(monkeypatch):
    spy = LaunchSpy(fipo_triton._chunk_totals_kernel)
    monkeypatch.setattr(fipo_triton, "_chunk_totals_kernel", spy)
    logps, old, adv, mask = random_batch(3, 40, seed=2)
    h = hyperparameters()
    ref = reference(logps, old, adv, mask, h)
    auto = compute_triton(logps, old, adv, mask, h)
    assert spy.launches == 0
    monkeypatch.setenv(fipo_triton.VARIANT_ENV, "chunk")  # what benchmarks set to force the chunk variant
    forced = compute_triton(logps, old, adv, mask, h)
    assert spy.launches == 1
    assert_matches_reference(forced, ref, torch.float32)
    torch.testing.assert_close(forced.weights, auto.weights, rtol=0, atol=1e-5)  # both within 1e-5 of the reference
    compute_triton(logps, old, adv, mask, h, variant="row")  # an explicit variant wins over the environment
    assert spy.launches == 1
    monkeypatch.setenv(fipo_triton.VARIANT_ENV, "fast")
    with pytest.raises(ValueError, match=fipo_triton.VARIANT_ENV):
        compute_triton(logps, old, adv, mask, h)
