"""FIPO compute paths, installed as ``fipo_trl.kernels``: torch, C and Triton only, nothing from TRL.

- ``naive.py``: the slow float64 reference of the official loss (documentation and test oracle).
- ``fipo_torch.py``: the O(T) blocked-scan torch path (float64, and CPU where no C compiler exists).
- ``fipo_cpu.c`` / ``fipo_cpu.py``: the fused C kernel, compiled on first use (the CPU path).
- ``fipo_triton.py``: the Liger-style fused Triton kernels (the CUDA path); importable without triton or a GPU.
"""

from .fipo_cpu import cpu_kernel_status, cpu_kernel_usable, fipo_loss_cpu
from .fipo_torch import FIPOTorchResult, discounted_reverse_cumsum, fipo_loss_torch, weight_bounds
from .fipo_triton import (
    TRITON_AVAILABLE,
    FIPOLossFunction,
    fipo_loss_triton,
    fipo_weights_triton,
    triton_usable,
)
from .naive import discounted_reverse_cumsum_naive, fipo_loss_naive

__all__ = [
    "FIPOLossFunction",
    "FIPOTorchResult",
    "TRITON_AVAILABLE",
    "cpu_kernel_status",
    "cpu_kernel_usable",
    "discounted_reverse_cumsum",
    "discounted_reverse_cumsum_naive",
    "fipo_loss_cpu",
    "fipo_loss_naive",
    "fipo_loss_torch",
    "fipo_loss_triton",
    "fipo_weights_triton",
    "triton_usable",
    "weight_bounds",
]
