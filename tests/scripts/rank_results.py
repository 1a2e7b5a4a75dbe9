"""Shared by the run scripts: their common arguments, and each rank writing what it saw."""

import argparse
import json

import torch


def write_rank_result(result_dir, accelerator, result: dict) -> None:
    with open(f"{result_dir}/rank{accelerator.process_index}.json", "w") as f:
        json.dump(result, f)
    if torch.distributed.is_initialized():  # an explicit teardown avoids a sporadic abort at exit with gloo
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_parser() -> argparse.ArgumentParser:
    """The arguments every run script takes: the model, the run's output_dir, and where each rank's record goes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("model_path")
    parser.add_argument("output_dir")
    parser.add_argument("result_dir")
    return parser
