"""The fused FIPO path in Triton (the CUDA path): one read of the inputs per pass, no T x T buffers.

Two ways to run the same kernel, ``_fipo_kernel`` (``compute_triton(variant=...)``, picked by ``choose_variant``):

- ``"row"``: one program per row. It walks the row in blocks of ``BLOCK`` tokens from its END, so the discounted
  reverse scan F_t = x_t + gamma * F_{t+1} becomes a FORWARD ``tl.associative_scan`` over reversed offsets plus a
  scalar carry (``reverse=True`` is avoided: triton issue #4362). One launch.
- ``"chunk"``: one program per (row, chunk of ``CHUNK`` tokens), for few long rows (B programs would leave most
  multiprocessors idle). F_t = (chunk-local reverse scan)_t + gamma^(end - t) * F_end, where F_end is F at the first
  token of the next chunk. Four launches: ``_chunk_totals_kernel`` sums each chunk's discounted log-ratios (the
  local F at the chunk start), ``_chunk_carries_kernel`` scans those totals over the chunks of a row (decay
  gamma^CHUNK) into each chunk's F_end, ``_fipo_kernel`` then runs each chunk exactly as the row kernel runs a row,
  starting from that carry instead of 0, and writes per-chunk partial stats, and ``_chunk_rows_kernel`` turns the
  chunks' dual-clip counts and loss sums into each row's sequence-filter decision and loss sum. The totals pass
  recomputes the log-ratio rather than storing a chunk-local F: re-reading log-probs and mask (9 B/token in fp32)
  is cheaper than writing and re-reading a float F (8 B) and reading the inputs again anyway.

Everything else is elementwise in registers: the clamped log-ratio, the participation filter, exp/clip/safety rule
of the weight, the dual-clip PPO loss, its gradient w.r.t. logps and the stats. Accumulation is fp32 whatever the
input dtype. The kernel writes f, A * f, F, keep, one row of ``common.ROW_STATS`` per sequence (per chunk in the
chunk path, whose sum/min/max over chunks is the row's: ``common.reduce_row_stats`` reduces them like rows) and,
when asked, each row's loss sum and the unscaled per-token gradient; ``common.result_from_rows`` reduces the rows and
attaches the loss (``common.LossWithStoredGradient``: the backward only scales the stored gradient).

Floating-point contraction is pinned (``FP_FUSION``, passed at every launch): Triton 3.9 fuses a * b + c into one
FMA by default and 3.10 will not, which would shift results between versions. It is off, so the compiled kernel
rounds every multiply and add as the interpreter (numpy, what CI runs) does; the GPU then differs from the
interpreter only by its approximate exp/exp2 (docs/gpu.md, "Accuracy"). Importable without triton or a GPU
(``TRITON_AVAILABLE`` is then False); needs nothing beyond triton itself.
"""

from __future__ import annotations

import functools
import math
import os
import types

import torch

from . import env
from .common import (
    COLUMN,
    LOG_RATIO_CLAMP,
    N_STATS,
    NEG_RATIO_EDGES,
    POS_MINI_RATIO,
    SAFETY_WEIGHT_RANGE,
    WEIGHT_CHANGED_TOLERANCE,
    FIPOResult,
    Hyperparameters,
    needs_gradient,
    result_from_rows,
)

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # no triton: the torch path still works
    TRITON_AVAILABLE = False

# Triton decides between a GPU driver and the CPU interpreter when the kernels are defined (at import).
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEFAULT_BLOCK_SIZE = 1024  # tokens per block on GPU; a row loops over cdiv(T, BLOCK) blocks
# The block sizes the row variant can launch: next_power_of_2(max(T, 16)) up to DEFAULT_BLOCK_SIZE.
ROW_BLOCK_SIZES = tuple(2**k for k in range(4, DEFAULT_BLOCK_SIZE.bit_length()))
# Tokens per program of the chunk variant (one block each), largest first: the largest that still gives every
# multiprocessor TARGET_PROGRAMS_PER_SM programs (several waves, so uneven rows and the tail balance out), else the
# smallest. Larger chunks mean fewer per-chunk stats rows and carries; smaller ones more programs.
CHUNK_SIZES = (1024, 512, 256)
TARGET_PROGRAMS_PER_SM = 4
# The chunk variant costs three more launches, a second read of log-probs and mask and >= 4 dependent passes of
# ~1.2 us; the row variant costs ~1.2 us per 1024-token block, one after the other. On GPU time (what a training
# step sees: its host side runs ahead) the chunks win from ~4K tokens per row; 8K leaves a factor of 2 for the
# model's guesses (docs/gpu.md; benchmarks/gpu_report.py measures both variants).
CHUNKED_MIN_ROW_LENGTH = 8192
MAX_CARRY_BLOCK_SIZE = 1024  # chunks per block of the carry scan and the rows pass (1M tokens in chunks of 1024)
FP_FUSION = False  # see the module docstring
VARIANTS = env.TRITON_VARIANTS  # ("auto", "row", "chunk")
VARIANT_ENV = "FIPO_TRL_TRITON_VARIANT"  # forces "row" or "chunk" for every call left at "auto" (benchmarks)


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device`` in this process."""
    if not TRITON_AVAILABLE:
        return False
    return device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRETED)


def warps_for(block_size: int) -> int:
    """Warps per program for a block of ``block_size`` tokens: at most 4 tokens per thread (4 to 16 warps). At 8
    tokens per thread (1024 with 4 warps) ptxas caps the kernel at 168 registers and spills on sm_80
    (tests/kernels/test_triton_compile.py); 4 per thread needs ~110."""
    return min(16, max(4, block_size // 128))


def launch_options(block_size: int) -> dict:
    """The compile options of every launch (and of tests/kernels/test_triton_compile.py): warps and FP fusion."""
    return {"num_warps": warps_for(block_size), "enable_fp_fusion": FP_FUSION}


def choose_variant(B: int, T: int, multiprocessors: int | None) -> str:
    """"chunk" when the rows alone leave multiprocessors idle (B < multiprocessors) and they are long enough
    (T >= CHUNKED_MIN_ROW_LENGTH) for the extra passes to pay; else "row". ``multiprocessors`` None (the CPU
    interpreter, no multiprocessors to fill): "row"."""
    if multiprocessors is None or B >= multiprocessors or T < CHUNKED_MIN_ROW_LENGTH:
        return "row"
    return "chunk"


def chunk_size_for(B: int, T: int, multiprocessors: int) -> int:
    """The largest of CHUNK_SIZES giving at least TARGET_PROGRAMS_PER_SM programs per multiprocessor, else the
    smallest."""
    for chunk in CHUNK_SIZES:
        if B * triton.cdiv(T, chunk) >= TARGET_PROGRAMS_PER_SM * multiprocessors:
            return chunk
    return CHUNK_SIZES[-1]


def carry_block_size(n_chunks: int) -> int:
    """Chunks per block of the carry scan and the rows pass: a power of two from 16 up to MAX_CARRY_BLOCK_SIZE."""
    return min(MAX_CARRY_BLOCK_SIZE, triton.next_power_of_2(max(n_chunks, 16)))


@functools.lru_cache(maxsize=16)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


if TRITON_AVAILABLE:
    # A Triton kernel reads only constexpr globals and modules: each row-stat column's index as COLUMNS.<name>, a
    # module generated from common.ROW_STATS, and the shared constants.
    COLUMNS = types.ModuleType("row_stat_columns")
    for _name, _index in COLUMN.items():
        setattr(COLUMNS, _name, tl.constexpr(_index))
    _LOG_RATIO_CLAMP = tl.constexpr(LOG_RATIO_CLAMP)
    _SAFETY_MIN, _SAFETY_MAX = (tl.constexpr(v) for v in SAFETY_WEIGHT_RANGE)
    _NEG_EDGE_0, _NEG_EDGE_1, _NEG_EDGE_2 = (tl.constexpr(v) for v in NEG_RATIO_EDGES)
    _POS_MINI_RATIO = tl.constexpr(POS_MINI_RATIO)
    _WEIGHT_CHANGED_TOLERANCE = tl.constexpr(WEIGHT_CHANGED_TOLERANCE)

    @triton.jit
    def _discounted_combine(log2_decay_a, value_a, log2_decay_b, value_b):
        # (a then b): y = y_b + gamma^(n_b) * y_a. The decay is carried as a log2 exponent, not as a product of
        # rounded gammas: exp2(n * log2 gamma) keeps gamma^n accurate to a few ulp for any distance n.
        return log2_decay_a + log2_decay_b, value_b + tl.exp2(log2_decay_b) * value_a

    @triton.jit
    def _log_ratio_block(LOGPS, OLD_LOGPS, MASK, row, pos, in_segment, stride_logps, stride_old, stride_mask, delta):
        """One block's response mask, raw and clamped log-ratio, ratio, participation and the scanned value x."""
        mask = tl.load(MASK + row * stride_mask + pos, mask=in_segment, other=0) != 0
        logp = tl.load(LOGPS + row * stride_logps + pos, mask=mask, other=0.0).to(tl.float32)
        old = tl.load(OLD_LOGPS + row * stride_old + pos, mask=mask, other=0.0).to(tl.float32)
        raw_log_ratio = logp - old
        log_ratio = tl.where(mask, tl.minimum(tl.maximum(raw_log_ratio, -_LOG_RATIO_CLAMP), _LOG_RATIO_CLAMP), 0.0)
        ratio = tl.exp(log_ratio)
        participates = mask & (ratio <= delta)
        x = tl.where(participates, log_ratio, 0.0)
        return mask, raw_log_ratio, log_ratio, ratio, participates, x

    @triton.jit
    def _store_row_level_columns(out, KEEP_ROW, n_tokens, n_dual):
        """The sequence filter (docs/algorithm.md §1.7: more than one dual-clipped token drops the row) and the
        stats that depend on it; returns whether the row is kept."""
        kept = n_dual <= 1
        has_tokens = n_tokens > 0
        tl.store(KEEP_ROW, kept.to(tl.int8))
        tl.store(out + COLUMNS.n_final_tokens, tl.where(kept, n_tokens, 0.0))
        tl.store(out + COLUMNS.n_rows, has_tokens.to(tl.float32))
        tl.store(out + COLUMNS.n_dropped_rows, (has_tokens & ~kept).to(tl.float32))
        return kept

    @triton.jit
    def _fipo_kernel(
        LOGPS, OLD_LOGPS, ADVANTAGES, MASK,  # inputs: (B, T), (B, T), (B,) or (B, T), (B, T) uint8
        WEIGHTS, FUTURE_KL, WEIGHTED_ADV, GRAD,  # outputs: (B, T) fp32 each (GRAD only if STORE_GRAD)
        KEEP, ROW_LOSS, ROW_STATS,  # outputs: (B,) int8, loss sums (only if STORE_LOSS), stats (., N_STATS) fp32
        CARRY,  # chunk variant: (B, n_chunks) fp32, F at the first token after each chunk
        T, n_chunks, stride_logps, stride_old, stride_adv_row, stride_adv_col, stride_mask,
        log2_gamma, clip_lower, clip_upper, lower_clipped_at, upper_clipped_at, safety_threshold, delta,
        ratio_low, ratio_high,
        UPPER_ONLY: tl.constexpr,  # clip_ratio == 0: min(exp F, 10), no lower bound
        STORE_LOSS: tl.constexpr,
        STORE_GRAD: tl.constexpr,
        N_STATS: tl.constexpr,
        BLOCK: tl.constexpr,
        CHUNK: tl.constexpr,  # 0: one program per row (grid (B,)); else tokens per program (grid (n_chunks, B))
    ):
        zero = tl.full([], 0.0, tl.float32)
        if CHUNK == 0:
            row = tl.program_id(0).to(tl.int64)
            segment = row  # the row of ROW_STATS / ROW_LOSS this program writes
            start = 0
            end = T
            carry = zero  # F at the first position of the previous (later-in-time) block
        else:
            chunk = tl.program_id(0)
            row = tl.program_id(1).to(tl.int64)
            segment = row * n_chunks + chunk
            start = chunk * CHUNK
            end = tl.minimum(start + CHUNK, T)
            carry = tl.load(CARRY + segment)
        lane = tl.arange(0, BLOCK)
        # lane i of block k holds position end - 1 - (k * BLOCK + i): a forward scan over lanes runs backwards in t
        carry_decay = tl.exp2((lane + 1).to(tl.float32) * log2_gamma)  # gamma^(i + 1): reach of F_{block end + 1}
        inf = tl.full([], float("inf"), tl.float32)
        n_tokens = zero
        n_dual = zero
        loss_sum = zero
        sum_neg_log_ratio = zero
        sum_future_kl = zero
        n_active = zero
        n_filtered = zero
        n_pg_clipped = zero
        n_safety = zero
        sum_weight = zero
        min_weight = inf
        max_weight = -inf
        sum_raw = zero
        min_raw = inf
        max_raw = -inf
        n_upper = zero
        n_lower = zero
        n_changed = zero
        n_neg_2_3 = zero
        n_neg_3_4 = zero
        n_neg_4_c = zero
        n_pos_mini = zero
        max_neg_ratio = -inf
        max_pos_ratio = -inf
        min_pos_ratio = inf

        for block in range(0, tl.cdiv(end - start, BLOCK)):
            pos = end - 1 - block * BLOCK - lane
            in_segment = pos >= start
            mask, raw_log_ratio, log_ratio, ratio, participates, x = _log_ratio_block(
                LOGPS, OLD_LOGPS, MASK, row, pos, in_segment, stride_logps, stride_old, stride_mask, delta)
            adv = tl.load(ADVANTAGES + row * stride_adv_row + pos * stride_adv_col, mask=mask, other=0.0)
            adv = tl.where(mask, adv.to(tl.float32), 0.0)  # where, not *: NaN advantages at padding stay out

            # reverse discounted scan of this block (forward over lanes), then the later blocks through the carry
            _, local = tl.associative_scan((tl.full([BLOCK], 0.0, tl.float32) + log2_gamma, x), 0,
                                           _discounted_combine)
            future_kl = local + carry_decay * carry
            carry = tl.sum(tl.where(lane == BLOCK - 1, future_kl, 0.0), 0)

            raw = tl.exp(future_kl)
            if UPPER_ONLY:
                clipped = tl.minimum(raw, clip_upper)
            else:
                clipped = tl.minimum(tl.maximum(raw, clip_lower), clip_upper)
            negative_adv = adv < 0
            safety = negative_adv & (ratio > safety_threshold)
            weight = tl.where(safety, tl.minimum(tl.maximum(clipped, _SAFETY_MIN), _SAFETY_MAX), clipped)
            tl.store(WEIGHTS + row * T + pos, weight, mask=in_segment)
            tl.store(FUTURE_KL + row * T + pos, future_kl, mask=in_segment)

            # dual-clip PPO surrogate on the weighted advantage (same operation order as the C kernel)
            weighted_adv = adv * weight
            tl.store(WEIGHTED_ADV + row * T + pos, weighted_adv, mask=in_segment)
            loss1 = -weighted_adv * ratio
            loss2 = -weighted_adv * tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
            clip_loss = tl.maximum(loss1, loss2)
            loss3 = -weighted_adv * delta
            negative = weighted_adv < 0
            if STORE_LOSS:
                token_loss = tl.where(negative, tl.minimum(loss3, clip_loss), clip_loss)
                loss_sum += tl.sum(tl.where(mask, token_loss, 0.0), 0)
            dual_clipped = negative & (clip_loss > loss3) & mask
            if STORE_GRAD:
                # d loss / d logp before the 1 / (kept tokens) scale: only the ratio carries gradient
                ratio_live = tl.where(weighted_adv >= 0, ratio < ratio_high, (ratio > ratio_low) & (ratio < delta))
                live = mask & ratio_live & (tl.abs(raw_log_ratio) <= _LOG_RATIO_CLAMP)
                tl.store(GRAD + row * T + pos, tl.where(live, -weighted_adv * ratio, 0.0), mask=in_segment)

            # the stats (response tokens, before the sequence filter)
            ones = mask.to(tl.float32)
            positive_adv = adv > 0
            n_tokens += tl.sum(ones, 0)
            n_dual += tl.sum(dual_clipped.to(tl.float32), 0)
            sum_neg_log_ratio += tl.sum(-log_ratio, 0)
            sum_future_kl += tl.sum(tl.where(mask, future_kl, 0.0), 0)
            n_active += tl.sum((mask & (log_ratio != 0)).to(tl.float32), 0)
            n_filtered += tl.sum((mask & ~participates).to(tl.float32), 0)
            n_pg_clipped += tl.sum((mask & (loss2 > loss1)).to(tl.float32), 0)
            n_safety += tl.sum((mask & safety).to(tl.float32), 0)
            sum_weight += tl.sum(tl.where(mask, weight, 0.0), 0)
            min_weight = tl.minimum(min_weight, tl.min(tl.where(mask, weight, inf), 0))
            max_weight = tl.maximum(max_weight, tl.max(tl.where(mask, weight, -inf), 0))
            sum_raw += tl.sum(tl.where(mask, raw, 0.0), 0)
            min_raw = tl.minimum(min_raw, tl.min(tl.where(mask, raw, inf), 0))
            max_raw = tl.maximum(max_raw, tl.max(tl.where(mask, raw, -inf), 0))
            n_upper += tl.sum((mask & (weight >= upper_clipped_at)).to(tl.float32), 0)
            n_lower += tl.sum((mask & (weight <= lower_clipped_at)).to(tl.float32), 0)
            n_changed += tl.sum((mask & (tl.abs(weight - 1.0) > _WEIGHT_CHANGED_TOLERANCE)).to(tl.float32), 0)
            neg_mask = mask & negative_adv
            pos_mask = mask & positive_adv
            n_neg_2_3 += tl.sum((neg_mask & (ratio >= _NEG_EDGE_0) & (ratio < _NEG_EDGE_1)).to(tl.float32), 0)
            n_neg_3_4 += tl.sum((neg_mask & (ratio >= _NEG_EDGE_1) & (ratio < _NEG_EDGE_2)).to(tl.float32), 0)
            n_neg_4_c += tl.sum((neg_mask & (ratio >= _NEG_EDGE_2) & (ratio < delta)).to(tl.float32), 0)
            n_pos_mini += tl.sum((pos_mask & (ratio < _POS_MINI_RATIO)).to(tl.float32), 0)
            max_neg_ratio = tl.maximum(max_neg_ratio, tl.max(tl.where(neg_mask, ratio, -inf), 0))
            max_pos_ratio = tl.maximum(max_pos_ratio, tl.max(tl.where(pos_mask, ratio, -inf), 0))
            min_pos_ratio = tl.minimum(min_pos_ratio, tl.min(tl.where(pos_mask, ratio, inf), 0))

        if STORE_LOSS:
            tl.store(ROW_LOSS + segment, loss_sum)
        out = ROW_STATS + segment * N_STATS
        tl.store(out + COLUMNS.n_tokens, n_tokens)
        tl.store(out + COLUMNS.sum_neg_log_ratio, sum_neg_log_ratio)
        tl.store(out + COLUMNS.sum_future_kl, sum_future_kl)
        tl.store(out + COLUMNS.n_active, n_active)
        tl.store(out + COLUMNS.n_filtered, n_filtered)
        tl.store(out + COLUMNS.n_pg_clipped, n_pg_clipped)
        tl.store(out + COLUMNS.n_dual_clipped, n_dual)
        tl.store(out + COLUMNS.n_safety, n_safety)
        tl.store(out + COLUMNS.sum_weight, sum_weight)
        tl.store(out + COLUMNS.min_weight, min_weight)
        tl.store(out + COLUMNS.max_weight, max_weight)
        tl.store(out + COLUMNS.sum_raw_weight, sum_raw)
        tl.store(out + COLUMNS.min_raw_weight, min_raw)
        tl.store(out + COLUMNS.max_raw_weight, max_raw)
        tl.store(out + COLUMNS.n_upper_clipped, n_upper)
        tl.store(out + COLUMNS.n_lower_clipped, n_lower)
        tl.store(out + COLUMNS.n_weight_changed, n_changed)
        tl.store(out + COLUMNS.n_neg_ratio_2_3, n_neg_2_3)
        tl.store(out + COLUMNS.n_neg_ratio_3_4, n_neg_3_4)
        tl.store(out + COLUMNS.n_neg_ratio_4_c, n_neg_4_c)
        tl.store(out + COLUMNS.n_pos_mini, n_pos_mini)
        tl.store(out + COLUMNS.max_neg_ratio, max_neg_ratio)
        tl.store(out + COLUMNS.max_pos_ratio, max_pos_ratio)
        tl.store(out + COLUMNS.min_pos_ratio, min_pos_ratio)
        if CHUNK == 0:
            _store_row_level_columns(out, KEEP + row, n_tokens, n_dual)
        else:  # a chunk cannot decide for its row: _chunk_rows_kernel fills the row's first chunk, the rest sum to 0
            tl.store(out + COLUMNS.n_final_tokens, zero)
            tl.store(out + COLUMNS.n_rows, zero)
            tl.store(out + COLUMNS.n_dropped_rows, zero)

    @triton.jit
    def _chunk_totals_kernel(
        LOGPS, OLD_LOGPS, MASK, TOTALS,  # TOTALS: (B, n_chunks) fp32, the chunk-local F at each chunk's first token
        T, n_chunks, stride_logps, stride_old, stride_mask, log2_gamma, delta,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        chunk = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        start = chunk * CHUNK
        offset = tl.arange(0, BLOCK)
        total = tl.full([], 0.0, tl.float32)
        for block in range(0, CHUNK // BLOCK):
            distance = block * BLOCK + offset  # from the chunk's first token
            pos = start + distance
            _, _, _, _, _, x = _log_ratio_block(LOGPS, OLD_LOGPS, MASK, row, pos, pos < T, stride_logps, stride_old,
                                                stride_mask, delta)
            # gamma^distance straight from its exponent: no product of rounded gammas
            total += tl.sum(x * tl.exp2(distance.to(tl.float32) * log2_gamma), 0)
        tl.store(TOTALS + row * n_chunks + chunk, total)

    @triton.jit
    def _chunk_carries_kernel(
        TOTALS, CARRY,  # (B, n_chunks) fp32 each
        n_chunks, log2_chunk_decay,  # log2(gamma^CHUNK): every chunk but a row's last is CHUNK tokens long
        BLOCK: tl.constexpr,
    ):
        # F at chunk c's first token: G_c = S_c + gamma^CHUNK * G_{c+1}, the row kernel's scan one level up (blocks
        # of chunks walked from the row's end). Chunk c starts from CARRY[c] = G_{c+1} (0 after the last chunk).
        row = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, BLOCK)
        carry_decay = tl.exp2((lane + 1).to(tl.float32) * log2_chunk_decay)
        tl.store(CARRY + row * n_chunks + n_chunks - 1, 0.0)
        carry = tl.full([], 0.0, tl.float32)
        for block in range(0, tl.cdiv(n_chunks, BLOCK)):
            chunk = n_chunks - 1 - block * BLOCK - lane
            total = tl.load(TOTALS + row * n_chunks + chunk, mask=chunk >= 0, other=0.0)
            _, local = tl.associative_scan((tl.full([BLOCK], 0.0, tl.float32) + log2_chunk_decay, total), 0,
                                           _discounted_combine)
            at_chunk_start = local + carry_decay * carry
            carry = tl.sum(tl.where(lane == BLOCK - 1, at_chunk_start, 0.0), 0)
            tl.store(CARRY + row * n_chunks + chunk - 1, at_chunk_start, mask=chunk >= 1)  # G_c is chunk c-1's carry

    @triton.jit
    def _chunk_rows_kernel(
        ROW_STATS, CHUNK_LOSS,  # (B * n_chunks, N_STATS), (B * n_chunks,) fp32: what _fipo_kernel wrote per chunk
        KEEP, ROW_LOSS,  # (B,) int8, (B,) fp32
        n_chunks,
        STORE_LOSS: tl.constexpr,
        N_STATS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, BLOCK)
        n_tokens = tl.full([], 0.0, tl.float32)
        n_dual = tl.full([], 0.0, tl.float32)
        loss_sum = tl.full([], 0.0, tl.float32)
        for block in range(0, tl.cdiv(n_chunks, BLOCK)):
            chunk = block * BLOCK + lane
            valid = chunk < n_chunks
            chunk_stats = ROW_STATS + (row * n_chunks + chunk) * N_STATS
            n_tokens += tl.sum(tl.load(chunk_stats + COLUMNS.n_tokens, mask=valid, other=0.0), 0)
            n_dual += tl.sum(tl.load(chunk_stats + COLUMNS.n_dual_clipped, mask=valid, other=0.0), 0)
            if STORE_LOSS:
                loss_sum += tl.sum(tl.load(CHUNK_LOSS + row * n_chunks + chunk, mask=valid, other=0.0), 0)
        _store_row_level_columns(ROW_STATS + row * n_chunks * N_STATS, KEEP + row, n_tokens, n_dual)
        if STORE_LOSS:
            tl.store(ROW_LOSS + row, loss_sum)


def _require_triton(device: torch.device) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError("fipo_trl: the Triton backend needs `triton`; install it or use backend='torch'.")
    if not triton_usable(device):
        raise RuntimeError(
            f"fipo_trl: the Triton backend cannot run on {device} tensors in this process. It needs CUDA tensors, "
            "or CPU tensors with TRITON_INTERPRET=1 set before fipo_trl is imported (the Triton CPU interpreter, for "
            "tests). Use backend='torch' (or 'auto') on CPU."
        )


def _resolve_variant(variant: str, B: int, T: int, device: torch.device) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"fipo_trl: Triton `variant` = {variant!r} is invalid: use one of {VARIANTS}.")
    if variant == "auto":
        variant = env.triton_variant()
    if variant != "auto":
        return variant
    return choose_variant(B, T, _multiprocessors(device) if device.type == "cuda" else None)


def compute_triton(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   hyperparameters: Hyperparameters, *, with_loss: bool = True, block_size: int | None = None,
                   variant: str = "auto", chunk_size: int | None = None) -> FIPOResult:
    """FIPO (docs/algorithm.md §1) through the fused kernel; same inputs and result as ``fipo_torch.compute_torch``.
    Computes in float32 (bf16/fp16/fp32 inputs); the gradient w.r.t. logps comes back in logps' dtype.
    ``with_loss=False``: no loss sums and no gradient are computed (constexpr switches of the kernel).

    ``variant``: "row" (one program per row), "chunk" (one per (row, chunk)) or "auto" (``choose_variant``, unless
    $FIPO_TRL_TRITON_VARIANT forces one). ``block_size``: tokens per block (a power of two); ``chunk_size``: tokens
    per program of the chunk variant (a multiple of the block size). Both default to the GPU's choice; tests pass
    small ones to cross block and chunk boundaries cheaply under the interpreter."""
    _require_triton(logps.device)
    if logps.dtype == torch.float64:
        raise TypeError("fipo_trl: the Triton backend computes in float32; float64 inputs (the reference dtype) "
                        "go through backend='torch'.")
    store_grad = needs_gradient(logps, with_loss)
    logps_leaf = logps
    logps, old_logps, advantages, mask = (t.detach().contiguous() for t in (logps, old_logps, advantages, mask))
    B, T = logps.shape
    device = logps.device
    weights = torch.empty(B, T, dtype=torch.float32, device=device)
    future_kl, weighted_adv = torch.empty_like(weights), torch.empty_like(weights)
    grad = torch.empty_like(weights) if store_grad else None
    row_loss = torch.empty(B, dtype=torch.float32, device=device) if with_loss else None
    keep = torch.empty(B, dtype=torch.bool, device=device)
    row_stats = torch.empty(B, N_STATS, dtype=torch.float32, device=device)
    if B > 0:
        variant = _resolve_variant(variant, B, T, device)
        h = hyperparameters
        mask_bytes = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        log2_gamma = math.log2(h.gamma)
        if variant == "chunk":
            chunk_size = chunk_size or chunk_size_for(B, T, _multiprocessors(device) if device.type == "cuda" else 1)
            block_size = block_size or chunk_size
            if chunk_size % block_size:
                raise ValueError(f"fipo_trl: chunk_size {chunk_size} is not a multiple of block_size {block_size}.")
            n_chunks = max(1, triton.cdiv(T, chunk_size))
            totals = torch.empty(B, n_chunks, dtype=torch.float32, device=device)
            carry = torch.empty_like(totals)
            _chunk_totals_kernel[(n_chunks, B)](
                logps, old_logps, mask_bytes, totals, T, n_chunks, logps.stride(0), old_logps.stride(0),
                mask_bytes.stride(0), log2_gamma, h.delta, CHUNK=chunk_size, BLOCK=block_size,
                **launch_options(block_size))
            carry_block = carry_block_size(n_chunks)
            _chunk_carries_kernel[(B,)](totals, carry, n_chunks, chunk_size * log2_gamma, BLOCK=carry_block,
                                        **launch_options(carry_block))
            stats_out = torch.empty(B * n_chunks, N_STATS, dtype=torch.float32, device=device)
            loss_out = torch.empty(B * n_chunks, dtype=torch.float32, device=device) if with_loss else None
            grid = (n_chunks, B)
        else:
            block_size = block_size or min(DEFAULT_BLOCK_SIZE, triton.next_power_of_2(max(T, 16)))
            chunk_size, n_chunks, carry, stats_out, loss_out, grid = 0, 1, weights, row_stats, row_loss, (B,)
        _fipo_kernel[grid](
            logps, old_logps, advantages, mask_bytes,
            weights, future_kl, weighted_adv, weights if grad is None else grad,  # placeholder pointers when unused
            keep.view(torch.int8), weights if loss_out is None else loss_out, stats_out, carry,
            T, n_chunks, logps.stride(0), old_logps.stride(0), advantages.stride(0),
            advantages.stride(1) if advantages.dim() == 2 else 0, mask_bytes.stride(0),
            log2_gamma, *h.weight_bounds, *h.clipped_at, h.safety_threshold, h.delta, *h.ratio_bounds,
            UPPER_ONLY=h.clip_ratio == 0, STORE_LOSS=with_loss, STORE_GRAD=store_grad, N_STATS=N_STATS,
            BLOCK=block_size, CHUNK=chunk_size, **launch_options(block_size),
        )
        if variant == "chunk":
            _chunk_rows_kernel[(B,)](
                stats_out, weights if loss_out is None else loss_out, keep.view(torch.int8),
                weights if row_loss is None else row_loss, n_chunks, STORE_LOSS=with_loss, N_STATS=N_STATS,
                BLOCK=carry_block, **launch_options(carry_block))
            row_stats = stats_out  # one row per chunk: reduce_row_stats reduces them as it reduces rows
    return result_from_rows(logps_leaf, weights=weights, weighted_advantages=weighted_adv, future_kl=future_kl,
                            keep=keep, row_stats=row_stats, row_loss=row_loss, unscaled_grad=grad,
                            stats_on_host=False)


__all__ = ["CHUNK_SIZES", "CHUNKED_MIN_ROW_LENGTH", "DEFAULT_BLOCK_SIZE", "FP_FUSION", "TRITON_AVAILABLE",
           "TRITON_INTERPRETED", "choose_variant", "chunk_size_for", "compute_triton", "launch_options",
           "triton_usable"]
