"""Shared by the multi-process scripts: each rank writes what it saw, then the process group is torn down."""

import json

import torch


def write_rank_result(result_dir, accelerator, result: dict) -> None:
    with open(f"{result_dir}/rank{accelerator.process_index}.json", "w") as f:
        json.dump(result, f)
    if torch.distributed.is_initialized():  # an explicit teardown avoids a sporadic abort at exit with gloo
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
