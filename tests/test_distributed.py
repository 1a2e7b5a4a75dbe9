"""Multi-process training through our accelerate configs, on CPU (gloo)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "accelerate_configs"


def launch(config, tmp_path, model_path, num_processes=2):
    results = tmp_path / "results"
    results.mkdir()
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    # `accelerate launch --cpu` and MULTI_CPU configs silently start ONE process: use the GPU launcher and tell
    # accelerate to place the processes on the CPU instead.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [accelerate, "launch", "--config_file", str(config), "--num_processes", str(num_processes),
               "--mixed_precision", "no", "--main_process_port", "29517",
               str(REPO / "tests" / "scripts" / "distributed_run.py"), model_path, str(tmp_path / "out"), str(results)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return [json.loads((results / f"rank{i}.json").read_text()) for i in range(num_processes)]


def test_ddp_config_trains_on_two_processes(tiny_model_path, tmp_path):
    ranks = launch(CONFIGS / "ddp.yaml", tmp_path, tiny_model_path)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["num_processes"] == 2 and r["distributed_type"] == "DistributedType.MULTI_CPU" for r in ranks)
    for r in ranks:  # every rank's own micro-batches saw a non-zero Future-KL after the on-policy first update
        assert r["local_future_kl_active"][0] is False and any(r["local_future_kl_active"][1:])
    assert ranks[0]["logged_active"] == ranks[1]["logged_active"]  # metrics are reduced over ranks
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"] and ranks[0]["param_head"] == ranks[1]["param_head"]
    assert ranks[0]["param_abs_sum"] == ranks[1]["param_abs_sum"]


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp2.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_accelerate_parses_our_configs(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert config.distributed_type.value == raw["distributed_type"]
    assert config.num_processes == raw["num_processes"] and config.mixed_precision == "bf16"
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-6])
    if name == "fsdp2.yaml":
        assert config.fsdp_config["fsdp_version"] == 2
