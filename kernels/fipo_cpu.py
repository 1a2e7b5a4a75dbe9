"""The fused FIPO loss on CPU: ``fipo_cpu.c`` compiled on first use, called through ctypes.

Why C and not more torch ops: on CPU the torch path's cost at a few thousand tokens is ~200 dispatcher calls of a
few microseconds each, not arithmetic, so its time per token falls 5x from T = 2K to 32K. The C kernel does the
whole official loss (log-ratio, filter, reverse scan, weights, dual-clip loss, gradient, the metrics' sums) in one
read of the inputs, like the Triton kernel on GPU: vectorised loops over 256-token chunks around a scalar scan, one
thread (so it never competes with torch's thread pool), and the same cost per token at any T.

The shared object is built with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``; Triton needs one
too) into ``$FIPO_TRL_CACHE`` (default ``~/.cache/fipo_trl``), named by a hash of the source, compiler and flags;
concurrent processes (DDP ranks) each write a temporary file and rename it into place. Without a compiler, or with
``FIPO_TRL_CPU_KERNEL=0``, ``cpu_kernel_usable()`` is False and ``fipo_loss(backend="auto")`` takes the torch path;
``cpu_kernel_status()`` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .fipo_torch import FIPOTorchResult, _LossWithStoredGradient, non_finite_error, weight_bounds

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fipo_cpu.c")
# Order of the stats the C kernel writes (the keys of fipo_torch._stats), then the loss and two error counts.
STATS_KEYS = ("n_tokens", "n_final_tokens", "sum_neg_log_ratio", "sum_future_kl", "n_active", "n_filtered",
              "n_pg_clipped", "n_dual_clipped", "n_safety", "sum_weight", "min_weight", "max_weight",
              "sum_raw_weight", "min_raw_weight", "max_raw_weight", "n_upper_clipped", "n_lower_clipped",
              "n_neg_ratio_2_3", "n_neg_ratio_3_4", "n_neg_ratio_4_c", "n_pos_mini", "max_neg_ratio",
              "max_pos_ratio", "min_pos_ratio", "n_rows", "n_dropped_rows")
N_OUT = len(STATS_KEYS) + 3  # + loss, NaN log-ratios, non-finite advantages
CHUNK_SIZE = 256  # tokens the kernel handles per step of a row (its CHUNK)
_BAD_RATIO, _BAD_ADV = N_OUT - 2, N_OUT - 1
# No -ffast-math (it would break the inf/NaN handling) and no -march=native (a cache on a shared home directory
# may be loaded by another CPU model: the source picks AVX2 at run time instead). -fno-trapping-math only lets the
# comparisons become vector selects (it ignores FP exception flags, which nothing reads).
BASE_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math")

_status = "not built yet"


def _cache_dir() -> Path:
    if os.environ.get("FIPO_TRL_CACHE"):
        return Path(os.environ["FIPO_TRL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fipo_trl"


def _compiler() -> str | None:
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((path for path in map(shutil.which, candidates) if path), None)


def _build(compiler: str, flags: tuple[str, ...], target: Path) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        command = [compiler, *flags, str(SOURCE), "-o", str(partial), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            logger.debug("fipo_trl: %s failed: %s", " ".join(command), result.stderr.strip())
            return False
        os.replace(partial, target)  # atomic: another process never loads a half-written file
    return True


@functools.cache
def _library() -> ctypes.CDLL | None:
    global _status
    if os.environ.get("FIPO_TRL_CPU_KERNEL", "1") == "0":
        _status = "disabled by FIPO_TRL_CPU_KERNEL=0"
        return None
    compiler = _compiler()
    if compiler is None:
        _status = "no C compiler found (set $CC, or install gcc or clang)"
        return None
    source = SOURCE.read_bytes()
    for flags in (BASE_FLAGS + ("-fopenmp-simd",), BASE_FLAGS):  # OpenMP's simd pragmas, when the compiler has them
        key = hashlib.sha256(source + repr((compiler, flags)).encode()).hexdigest()[:16]
        target = _cache_dir() / f"fipo_cpu_{key}.so"
        try:
            if not target.exists() and not _build(compiler, flags, target):
                continue
            library = ctypes.CDLL(str(target))
        except OSError as error:
            logger.debug("fipo_trl: loading %s failed: %s", target, error)
            continue
        if (library.fipo_cpu_n_out(), library.fipo_cpu_chunk()) != (N_OUT, CHUNK_SIZE):
            raise RuntimeError(f"fipo_trl: {target} does not match fipo_cpu.py (stale build); delete it.")
        library.fipo_cpu_forward.restype = ctypes.c_int
        library.fipo_cpu_forward.argtypes = (
            [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
            + [ctypes.c_double] * 7 + [ctypes.c_void_p] * 8
        )
        _status = f"built with {compiler} {' '.join(flags)} at {target}"
        return library
    _status = f"compiling {SOURCE.name} with {compiler} failed (see the debug log of {__name__})"
    logger.warning("fipo_trl: the fused CPU kernel is unavailable, %s; fipo_loss uses the slower torch path on CPU.",
                   _status)
    return None


def cpu_kernel_usable() -> bool:
    """Whether the fused CPU kernel is built (or builds now) and loads in this process."""
    return _library() is not None


def cpu_kernel_status() -> str:
    """How the fused CPU kernel was built, or why it is not available."""
    _library()
    return _status


def _as_float32(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 tensor to hand the kernel a pointer to (the tensor itself when it is one already)."""
    if tensor.dtype == torch.float32 and tensor.is_contiguous():
        return tensor
    return tensor.detach().to(torch.float32).contiguous()


def fipo_loss_cpu(logps, old_logps, advantages, mask, *, gamma, clip_ratio, clip_high_only, safety_threshold,
                  dual_clip, epsilon_low, epsilon_high) -> FIPOTorchResult:
    """The official FIPO loss (SPEC §1.1) in one C pass; same inputs and result as ``fipo_loss_torch``.

    Computes in float32 (bf16/fp16/fp32 inputs; sums in float64); the gradient w.r.t. logps comes back in logps'
    dtype. Unlike the other paths it checks the inputs' finiteness itself, in the same pass: a NaN log-ratio or a
    non-finite advantage at a response token raises the ``fipo_loss`` ValueError.
    """
    library = _library()
    if library is None:
        raise RuntimeError(f"fipo_trl: the fused CPU kernel is not available ({_status}). Use backend='torch'.")
    if logps.device.type != "cpu":
        raise RuntimeError(f"fipo_trl: the fused CPU kernel runs on CPU tensors, got {logps.device}. Use "
                           "backend='auto' (Triton on CUDA) or backend='torch'.")
    if logps.dtype == torch.float64:
        raise TypeError("fipo_trl: the fused CPU kernel computes in float32; float64 inputs (the reference dtype) "
                        "go through backend='torch'.")
    needs_grad = torch.is_grad_enabled() and logps.requires_grad
    B, T = logps.shape
    mask = mask if mask.dtype == torch.bool else mask != 0
    inputs = [_as_float32(t) for t in (logps, old_logps, advantages)] + [mask.contiguous()]  # bool: one byte each
    weights, future_kl, weighted_advantages = torch.empty(B, T), torch.empty(B, T), torch.empty(B, T)
    grad = torch.empty(B, T) if needs_grad else None
    keep = torch.empty(B, dtype=torch.bool)
    row_scale, loss, out = torch.empty(B), torch.empty(()), torch.empty(N_OUT, dtype=torch.float64)
    lower, upper = weight_bounds(clip_ratio, clip_high_only)
    status = library.fipo_cpu_forward(
        inputs[0].data_ptr(), inputs[1].data_ptr(), inputs[2].data_ptr(), int(advantages.dim() == 2),
        inputs[3].data_ptr(), B, T, gamma, lower, upper, safety_threshold, dual_clip,
        1.0 - epsilon_low, 1.0 + epsilon_high, weights.data_ptr(), future_kl.data_ptr(), weighted_advantages.data_ptr(),
        grad.data_ptr() if needs_grad else None, keep.data_ptr(), row_scale.data_ptr(), loss.data_ptr(),
        out.data_ptr(),
    )
    if status != 0:
        raise MemoryError(f"fipo_trl: the fused CPU kernel could not allocate its (B = {B}) row buffer.")
    values = out.tolist()  # the stats as Python floats: one transfer, no per-stat tensors
    if values[_BAD_RATIO] or values[_BAD_ADV]:
        raise non_finite_error(int(values[_BAD_RATIO]), int(values[_BAD_ADV]))
    if needs_grad:
        loss = _LossWithStoredGradient.apply(logps, loss, grad, row_scale)
    return FIPOTorchResult(loss, weights, future_kl, keep, dict(zip(STATS_KEYS, values)), weighted_advantages)


__all__ = ["CHUNK_SIZE", "STATS_KEYS", "cpu_kernel_status", "cpu_kernel_usable", "fipo_loss_cpu"]
