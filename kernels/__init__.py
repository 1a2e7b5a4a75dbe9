"""FIPO compute paths, installed as ``fipo_trl.kernels``: torch and Triton only, nothing from TRL.

- ``naive.py``: the slow float64 reference of the official loss (documentation and test oracle).
- ``fipo_torch.py``: the O(T) blocked-scan torch path (the CPU path).
"""

from .fipo_torch import FIPOTorchResult, discounted_reverse_cumsum, fipo_loss_torch, weight_bounds
from .naive import discounted_reverse_cumsum_naive, fipo_loss_naive

__all__ = [
    "FIPOTorchResult",
    "discounted_reverse_cumsum",
    "discounted_reverse_cumsum_naive",
    "fipo_loss_naive",
    "fipo_loss_torch",
    "weight_bounds",
]
