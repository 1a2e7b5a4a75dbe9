"""What this machine can run: Liger's GPU kernels and vLLM. GRPOConfig accepts both on any machine (a config may
be built on a CPU node for a GPU job), so FIPOConfig does too; FIPOTrainer and `fipo-trl train` check the machine
before the model loads."""

from __future__ import annotations

import importlib.util


def check_liger_machine(args) -> None:
    """use_liger_kernel on a machine without a GPU. Like check_vllm_machine, this checks the machine, not the config:
    GRPOConfig accepts both on any machine (a config may be built on a CPU node for a GPU job), so FIPOConfig does
    too, and FIPOTrainer and `fipo-trl train` check them before anything runs."""
    if args.use_liger_kernel and not gpu_available(args):
        raise ValueError("`use_liger_kernel=True` needs a GPU (Liger's kernels are Triton GPU kernels), and this "
                         "run has none. Fix: set use_liger_kernel=False.")


def check_vllm_machine(args) -> None:
    """use_vllm without a CUDA GPU or without vLLM: TRL would fail deep inside vLLM, or wait for a server."""
    if args.use_vllm and not gpu_available(args):
        raise ValueError("`use_vllm=True` needs a CUDA GPU, and this run has none. Fix: set use_vllm=False (TRL then "
                         "generates with transformers).")
    if args.use_vllm and not vllm_installed():
        raise ValueError("`use_vllm=True` needs vLLM, which is not installed. Fix: pip install vllm (a version TRL "
                         "supports), or set use_vllm=False.")


def gpu_available(args) -> bool:
    """Whether this run trains on a GPU (CUDA or XPU, and not `use_cpu`)."""
    import torch

    if args.use_cpu:
        return False
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None
