"""FIPO compute paths, installed as ``fipo_trl.kernels``: torch, C and Triton only, nothing from TRL. See README.md.

- ``common.py``: the contract they share (hyperparameters and defaults, constants, ``ROW_STATS`` and its reduction,
  the result type, the stored-gradient autograd function).
- ``fipo_torch.py``: the plain torch path (float64 inputs anywhere; the fallback where no fused path runs).
- ``fipo_cpu.c`` / ``fipo_cpu.py``: the fused C kernel, compiled on first use (the CPU path).
- ``fipo_triton.py``: the fused Triton kernel (the CUDA path); importable without triton or a GPU.
- ``scan.py``: the blocked discounted reverse scan of the torch path.
- ``env.py``: the ``FIPO_TRL_*`` environment variables, one reader each (docs/environment.md).
- ``naive.py``: the official algorithm written out in float64 (the test oracle) and as the official code runs it (the
  benchmark's baseline).
"""

from .common import DEFAULTS, ROW_STATS, STAT_NAMES, FIPOResult, Hyperparameters, decay_to_gamma, weight_bounds
from .fipo_cpu import compute_cpu, cpu_kernel_status, cpu_kernel_usable
from .fipo_torch import compute_torch
from .fipo_triton import TRITON_AVAILABLE, compute_triton, triton_usable
from .naive import discounted_reverse_cumsum_naive, fipo_loss_naive, future_kl_chunked, official_fipo_loss
from .scan import discounted_reverse_cumsum

__all__ = [
    "DEFAULTS",
    "FIPOResult",
    "Hyperparameters",
    "ROW_STATS",
    "STAT_NAMES",
    "TRITON_AVAILABLE",
    "compute_cpu",
    "compute_torch",
    "compute_triton",
    "cpu_kernel_status",
    "cpu_kernel_usable",
    "decay_to_gamma",
    "discounted_reverse_cumsum",
    "discounted_reverse_cumsum_naive",
    "fipo_loss_naive",
    "future_kl_chunked",
    "official_fipo_loss",
    "triton_usable",
    "weight_bounds",
]
