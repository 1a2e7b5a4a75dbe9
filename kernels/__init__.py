"""FIPO compute paths, installed as ``fipo_trl.kernels``: torch, C and Triton only, nothing from TRL. See README.md.

The package exports the paths' shared contract and their entry points:

- ``compute_torch``, ``compute_c``, ``compute_triton``: one signature, ``(logps, old_logps, advantages, mask,
  hyperparameters, *, with_loss=True) -> FIPOResult``, on inputs ``fipo_trl.loss`` has validated;
- ``c_kernel_usable``/``c_kernel_status``, ``triton_usable``/``TRITON_AVAILABLE``: whether a fused path runs here;
- the common types of ``common.py``: ``Hyperparameters`` with the official ``DEFAULTS``, ``FIPOResult``,
  ``ROW_STATS`` and ``STAT_NAMES``.

Everything else is imported by its module path: ``naive`` (the official algorithm written out, for the tests and the
benchmark), ``scan`` (the torch path's reverse scan), ``env`` (the ``FIPO_TRL_*`` environment variables, one reader
each: docs/environment.md) and each path's own module (``fipo_torch``, ``fipo_cpu`` for the C kernel, ``fipo_triton``).
"""

import warnings

from .common import DEFAULTS, ROW_STATS, STAT_NAMES, FIPOResult, Hyperparameters
from .fipo_cpu import c_kernel_status, c_kernel_usable, compute_c
from .fipo_torch import compute_torch
from .fipo_triton import TRITON_AVAILABLE, compute_triton, triton_usable

# Names of 0.1.0, kept for one release.
_DEPRECATED = {"compute_cpu": "compute_c", "cpu_kernel_usable": "c_kernel_usable",
               "cpu_kernel_status": "c_kernel_status"}


def __getattr__(name):
    if name in _DEPRECATED:
        warnings.warn(f"fipo_trl.kernels.{name} is deprecated and will be removed in 0.3.0: use "
                      f"fipo_trl.kernels.{_DEPRECATED[name]} (the C kernel's backend is now called 'c').",
                      DeprecationWarning, stacklevel=2)
        return globals()[_DEPRECATED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULTS",
    "FIPOResult",
    "Hyperparameters",
    "ROW_STATS",
    "STAT_NAMES",
    "TRITON_AVAILABLE",
    "c_kernel_status",
    "c_kernel_usable",
    "compute_c",
    "compute_torch",
    "compute_triton",
    "triton_usable",
]
