"""Test-only stand-in: lets accelerate run its FSDP2 and DeepSpeed code paths on a CPU-only machine (2 processes over
gloo), so that tests/trainer/test_sharded.py executes the sharded strategies our accelerate configs select.

It changes accelerate's device and process detection, and nothing else:

* ``AcceleratorState``: on CPU, accelerate resolves every multi-process launch to ``MULTI_CPU`` and drops the FSDP
  plugin it was given (its FSDP branch lists GPU-like devices only). When an FSDP plugin is given (or
  ``ACCELERATE_USE_FSDP=true``), the state is set to ``FSDP`` with that plugin, as on a GPU.
* ``PartialState``: under DeepSpeed on CPU (``DS_ACCELERATOR=cpu``) DeepSpeed initialises torch.distributed, but
  accelerate finds no backend and keeps ``num_processes`` 1 and ``process_index`` 0 on every rank. They are set from
  torch.distributed, as accelerate does on a GPU.

The sharding itself (torch's ``fully_shard``, DeepSpeed's ZeRO engines), TRL's and fipo_trl's code run unchanged.
Nothing in fipo_trl imports this module: a run script under tests/scripts/ imports it first.
"""

from __future__ import annotations

import os

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__
_partial_state_init = PartialState.__init__


def _init_accelerator_state(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    wants_fsdp = fsdp_plugin is not None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _init_partial_state(self, *args, **kwargs):
    _partial_state_init(self, *args, **kwargs)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and self.num_processes == 1 and dist.get_world_size() > 1:
        self.num_processes, self.process_index = dist.get_world_size(), dist.get_rank()
        self.local_process_index = int(os.environ.get("LOCAL_RANK", self.process_index))


AcceleratorState.__init__ = _init_accelerator_state
PartialState.__init__ = _init_partial_state
