"""Multi-process training through our accelerate configs, on CPU (gloo)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # subprocess runs of whole trainings

REPO = Path(__file__).resolve().parents[2]
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
    # only the main process took the output_dir lock (another rank taking it would have failed), released at the end
    assert not (tmp_path / "out" / "_fipo_trl_run.lock").exists()


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


def launch_dynamic_sampling(tmp_path, model_path, name, checkpoint=None):
    results = tmp_path / f"results-{name}"
    results.mkdir()
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [accelerate, "launch", "--config_file", str(CONFIGS / "ddp.yaml"), "--num_processes", "2",
               "--mixed_precision", "no", "--main_process_port", "29518",
               str(REPO / "tests" / "scripts" / "dynamic_sampling_run.py"), model_path, str(tmp_path / name),
               str(results), *([str(checkpoint)] if checkpoint else [])]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return [json.loads((results / f"rank{i}.json").read_text()) for i in range(2)]


def sampling_logs(rank):
    return [{k: v for k, v in h.items() if k.startswith("dynamic_sampling/")} for h in rank["log_history"]
            if any(k.startswith("dynamic_sampling/") for k in h)]


@pytest.mark.slow
def test_dynamic_sampling_on_two_processes_and_its_resume(tiny_model_path, tmp_path):
    """DAPO's filter_groups under accelerate + DDP (gloo, 2 processes): groups straddle the ranks, both ranks keep the
    same whole groups, train only mixed ones, log the same metrics, stay within the retry bound and end with the
    same parameters; a run resumed from a checkpoint on a generation-batch boundary continues identically."""
    full = launch_dynamic_sampling(tmp_path, tiny_model_path, "full")
    assert [r["num_processes"] for r in full] == [2, 2]
    assert len(full[0]["batches"]) == len(full[1]["batches"]) == 4  # 8 steps, 2 updates per generation batch
    logs = [sampling_logs(r) for r in full]
    assert logs[0] == logs[1] and len(logs[0]) == 4  # the metrics agree across ranks (one entry per generation)
    assert sum(log["dynamic_sampling/dropped_groups"] for log in logs[0]) > 0  # the reward did make uniform groups
    assert all(log["dynamic_sampling/retries"] <= 3 for log in logs[0])  # the retry bound
    for local0, local1 in zip(full[0]["batches"], full[1]["batches"]):
        assert len(local0["prompts"]) == len(local1["prompts"]) == 6  # each rank trains its own share
        assert local0["num_items_in_batch"] == local1["num_items_in_batch"]  # TRL's global token count
        prompts = local0["prompts"] + local1["prompts"]  # the generation batch, in TRL's rank order
        for g in range(0, 12, 4):
            assert len(set(prompts[g:g + 4])) == 1, prompts  # whole groups, one straddling the ranks
        filled = [log["dynamic_sampling/filled_groups"] for log in logs[0]]
    assert all(int(a) % 2 == 0 for b0, b1 in zip(full[0]["batches"], full[1]["batches"])
               for a in b0["answers"] + b1["answers"]) or any(filled)  # only mixed groups (unless filled)
    assert full[0]["params"] == full[1]["params"] and full[0]["param_sum"] == full[1]["param_sum"]
    assert full[0]["stream"] == full[1]["stream"] and full[0]["stream"]["position"] > 0  # refills were drawn

    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / "dynamic_sampling_state_0.json").exists()
    assert (checkpoint / "dynamic_sampling_state_1.json").exists()
    assert json.loads((checkpoint / "fipo_run_settings.json").read_text())["settings"]["world_size"] == 2
    resumed = launch_dynamic_sampling(tmp_path, tiny_model_path, "resumed", checkpoint=checkpoint)
    for before, after in zip(full, resumed):
        assert after["batches"] == before["batches"][2:]  # the same refill prompts and advantages
        # the resumed log history starts with the checkpoint's (steps 1-4), then steps 5-8 must match
        assert sampling_logs(after) == sampling_logs(before)
        losses = [[h["loss"] for h in run["log_history"] if "loss" in h] for run in (before, after)]
        assert len(losses[1]) == 8 and losses[1] == pytest.approx(losses[0], abs=1e-6)
        assert after["params"] == pytest.approx(before["params"], abs=1e-6)
