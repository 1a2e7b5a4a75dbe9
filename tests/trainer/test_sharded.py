"""The sharded strategies our accelerate configs select, executed: FSDP2 (full and sharded state dicts) and DeepSpeed
ZeRO-2/3 train FIPO on 2 CPU processes over gloo through `accelerate launch`, with the same losses and parameters as
DDP, and checkpoints our completeness check reads by their contents.

accelerate refuses to pick FSDP, and miscounts DeepSpeed's processes, on a CPU-only machine:
tests/scripts/cpu_sharding.py (test-only, imported by the run script) changes that detection and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_utils import load_report_module

from fipo_trl.safety.checkpoint_files import checkpoint_problems
from fipo_trl.safety.resume import resolve_resume

pytestmark = pytest.mark.slow  # subprocess runs of whole 2-process trainings

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "examples" / "accelerate_configs"
# strategy: (our config, the CPU overrides that must differ from it, the environment)
STRATEGIES = {
    "ddp": ("ddp.yaml", [], {"ACCELERATE_USE_CPU": "true"}),
    "fsdp2-full": ("fsdp2.yaml", [], {"ACCELERATE_USE_CPU": "true"}),
    "fsdp2-sharded": ("fsdp2.yaml", ["--fsdp_state_dict_type", "SHARDED_STATE_DICT"], {"ACCELERATE_USE_CPU": "true"}),
    "zero2": ("deepspeed_zero2.yaml", [], {"DS_ACCELERATOR": "cpu"}),
    "zero3": ("deepspeed_zero3.yaml", [], {"DS_ACCELERATOR": "cpu"}),
}
SHARDED = [name for name in STRATEGIES if name != "ddp"]
# Every strategy reduces the same float32 gradients in another order (DDP's bucketed all-reduce, FSDP2's
# reduce-scatter, DeepSpeed's partitioned reduction): a loss differs by a few float32 ulps (~3e-8 at 0.3), and a
# parameter after 4 Adam steps at lr 1e-2 by far less than 1 % of one step.
LOSS_TOLERANCE, PARAM_TOLERANCE = 1e-6, 1e-4


def launch(strategy: str, model_path: str, output_dir: Path, result_dir: Path, port: int, *extra: str,
           fails: bool = False, env: dict | None = None, processes: int = 2):
    """Run sharded_run.py under `accelerate launch` on ``processes`` CPU processes; each rank's result (or, with
    ``fails``, the failed launch itself)."""
    config, overrides, strategy_env = STRATEGIES[strategy]
    result_dir.mkdir(parents=True)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    command = [accelerate, "launch", "--config_file", str(CONFIGS / config), *overrides, "--num_processes",
               str(processes), "--mixed_precision", "no", "--main_process_port", str(port),
               str(REPO / "tests" / "scripts" / "sharded_run.py"), model_path, str(output_dir), str(result_dir),
               *extra]
    run = subprocess.run(command, env={**(os.environ if env is None else env), "OMP_NUM_THREADS": "1", **strategy_env},
                         capture_output=True, text=True, timeout=900)
    if fails:
        assert run.returncode != 0, run.stdout[-2000:]
        return run
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    ranks = [json.loads((result_dir / f"rank{i}.json").read_text()) for i in range(processes)]
    ranks[0]["stderr"] = run.stderr
    return ranks


@pytest.fixture(scope="module")
def runs(tiny_model_path, tmp_path_factory):
    """One 4-step run per strategy, from the same seed: {strategy: (output_dir, [rank 0 result, rank 1 result])}."""
    root = tmp_path_factory.mktemp("sharded")
    return {name: (root / name / "out", launch(name, tiny_model_path, root / name / "out", root / name / "results",
                                                29541 + i))
            for i, name in enumerate(STRATEGIES)}


@pytest.mark.parametrize("strategy", SHARDED)
def test_fipo_trains_under_each_strategy_as_under_ddp(runs, strategy):
    _, ranks = runs[strategy]
    _, ddp = runs["ddp"]
    expected_type = "DEEPSPEED" if strategy.startswith("zero") else "FSDP"
    assert all(r["num_processes"] == 2 and r["distributed_type"] == f"DistributedType.{expected_type}" for r in ranks)
    assert ranks[0]["active"][0] == 0 and ranks[0]["active"][1] > 0.9  # FIPO acts from each batch's 2nd update
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 4
    assert ranks[0]["losses"] == pytest.approx(ddp[0]["losses"], abs=LOSS_TOLERANCE, rel=0)
    assert ranks[0]["param_names"] == ddp[0]["param_names"]
    worst = max(abs(a - b) for a, b in zip(ranks[0]["params"], ddp[0]["params"], strict=True))
    assert worst <= PARAM_TOLERANCE, worst


LAYOUT = {  # files each strategy's checkpoint must hold (beyond trainer_state.json and the RNG states)
    "ddp": ["model.safetensors", "optimizer.pt"],
    "fsdp2-full": ["pytorch_model_fsdp.bin", "optimizer.bin"],
    "fsdp2-sharded": ["pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0/__0_0.distcp",
                      "pytorch_model_fsdp_0/__1_0.distcp", "optimizer_0/.metadata", "optimizer_0/__1_0.distcp"],
    "zero2": ["latest", "global_step4/mp_rank_00_model_states.pt",
              "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt"],
    "zero3": ["latest", "global_step4/zero_pp_rank_0_mp_rank_00_model_states.pt",
              "global_step4/zero_pp_rank_1_mp_rank_00_model_states.pt",
              "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt"],
}


def cut_short(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# what a bad copy or a disk fault leaves in each layout, and how the check names it
DAMAGE = {
    "fsdp2-full": ("optimizer.bin", "optimizer.bin is truncated"),
    "fsdp2-sharded": ("pytorch_model_fsdp_0/__1_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp is truncated"),
    "zero2": ("global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt is truncated"),
    "zero3": ("global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt is truncated"),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_checkpoints_save_in_the_strategys_layout_and_are_complete_by_their_contents(runs, strategy):
    output_dir, _ = runs[strategy]
    for step in (2, 4):
        checkpoint = output_dir / f"checkpoint-{step}"
        assert checkpoint_problems(checkpoint) == [], step
        assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
        assert (checkpoint / "fipo_run_settings.json").is_file()  # written once, by the main process
    for name in LAYOUT[strategy]:
        assert (output_dir / "checkpoint-4" / name).is_file(), name
    # the main process alone held the lock and the save markers, and released them; the card was written
    assert not list(output_dir.glob("_saving_*")) and not (output_dir / "_fipo_trl_run.lock").exists()
    assert "FIPO" in (output_dir / "README.md").read_text()


@pytest.mark.parametrize("strategy", SHARDED)
def test_a_shard_cut_short_makes_the_checkpoint_incomplete_and_resume_skips_it(runs, strategy, tmp_path):
    output_dir, _ = runs[strategy]
    damaged = tmp_path / "out"
    shutil.copytree(output_dir, damaged)
    name, problem = DAMAGE[strategy]
    cut_short(damaged / "checkpoint-4" / name)
    assert any(problem in p for p in checkpoint_problems(damaged / "checkpoint-4")), problem
    checkpoint, messages = resolve_resume(True, damaged)
    assert checkpoint == str(damaged / "checkpoint-2")
    assert "skipping the partial checkpoint" in messages[0] and problem in messages[0]


def test_a_missing_rank_partition_makes_a_deepspeed_checkpoint_incomplete(runs, tmp_path):
    damaged = tmp_path / "checkpoint-4"
    shutil.copytree(runs["zero2"][0] / "checkpoint-4", damaged)
    (damaged / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert checkpoint_problems(damaged) == ["global_step4 holds the optimizer partitions of ranks [0], not of all 2 "
                                            "processes"]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_the_final_model_is_saved_whole_and_loads_in_one_process_and_generates(runs, strategy):
    # fsdp2-sharded too: transformers saves no final model for SHARDED_STATE_DICT; SafeCheckpointsMixin gathers it
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fipo_trl.safety.shard_files import safetensors_problem

    output_dir, ranks = runs[strategy]
    final = output_dir / "final"
    assert safetensors_problem(final / "model.safetensors") is None  # present and whole
    model = AutoModelForCausalLM.from_pretrained(final)  # one process, no accelerate, no DeepSpeed
    state = model.state_dict()
    flat = torch.cat([state[name].double().flatten() for name in ranks[0]["param_names"]])
    assert flat.tolist() == ranks[0]["params"]  # the trained weights, gathered whole from the shards
    tokenizer = AutoTokenizer.from_pretrained(final)
    prompt = tokenizer("what is one plus one ?", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.parametrize("strategy", SHARDED)
def test_a_rank_killed_during_a_save_then_resume_true_ends_at_the_uninterrupted_parameters(
        tiny_model_path, runs, strategy, tmp_path):
    port = 29561 + SHARDED.index(strategy)
    killed = launch(strategy, tiny_model_path, tmp_path / "out", tmp_path / "killed", port, "--kill_rank1_in_save",
                    "4", fails=True)
    assert "local_rank: 1" in killed.stderr and "Signal 9 (SIGKILL)" in killed.stderr
    problems = checkpoint_problems(tmp_path / "out" / "checkpoint-4")
    assert "its save never finished (_saving_checkpoint-4 is still there)" in problems
    resumed = launch(strategy, tiny_model_path, tmp_path / "out", tmp_path / "resumed", port, "--resume")
    assert resumed[0]["global_step"] == 4 and (tmp_path / "out" / "incomplete-checkpoint-4").is_dir()
    assert resumed[0]["losses"][-2:] == pytest.approx(runs[strategy][1][0]["losses"][-2:], abs=LOSS_TOLERANCE, rel=0)
    worst = max(abs(a - b) for a, b in zip(resumed[0]["params"], runs[strategy][1][0]["params"], strict=True))
    assert worst <= PARAM_TOLERANCE, worst


def test_a_rank_killed_mid_run_ends_the_others_naming_it(tiny_model_path, tmp_path):
    import time

    start = time.monotonic()
    killed = launch("zero3", tiny_model_path, tmp_path / "out", tmp_path / "results", 29571, "--kill_rank1_at_step",
                    "2", fails=True)
    assert time.monotonic() - start < 300  # torchrun's agent ends the surviving rank; it never waits forever
    assert "local_rank: 1" in killed.stderr and "Signal 9 (SIGKILL)" in killed.stderr
    assert not (tmp_path / "results" / "rank0.json").exists()  # rank 0 did not carry on alone


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2-full"])
def test_lora_a_reference_model_and_dynamic_sampling_train_together(tiny_model_path, strategy, tmp_path):
    ranks = launch(strategy, tiny_model_path, tmp_path / "out", tmp_path / "results",
                   29581 + SHARDED.index(strategy), "--lora_reference_dynamic")
    assert ranks[0]["global_step"] == 4 and ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["active"][1] > 0.9  # FIPO acts on each generation batch's second update
    assert len(ranks[0]["kl"]) == 4 and any(kl > 0 for kl in ranks[0]["kl"])  # the reference model is in the loss
    assert len(ranks[0]["dynamic_sampling"]) == 2  # it ran on each of the 2 generation batches (2 updates each)
    assert any("lora" in name for name in ranks[0]["param_names"])
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()
    assert checkpoint_problems(tmp_path / "out" / "checkpoint-4") == []


def test_a_zero_checkpoint_resumed_on_another_number_of_processes_is_refused_naming_both(runs):
    from fipo_trl.safety.resume_checks import check_world_size

    for strategy in ("zero2", "zero3"):
        checkpoint = runs[strategy][0] / "checkpoint-4"
        check_world_size(checkpoint, 2)
        with pytest.raises(ValueError, match=r"a DeepSpeed ZeRO checkpoint saved by 2 processes, and this run has "
                                             r"1: .*Fix: resume on 2 processes"):
            check_world_size(checkpoint, 1)
    for strategy in ("ddp", "fsdp2-full", "fsdp2-sharded"):  # these reshard or hold the whole state
        check_world_size(runs[strategy][0] / "checkpoint-4", 1)


def test_a_zero3_run_pushes_its_checkpoints_and_its_whole_model_with_the_fipo_card(tiny_model_path, tmp_path):
    import secrets

    from hub_stand_in import HubStandIn, hub_env

    token = f"hf_{secrets.token_hex(16)}"
    with HubStandIn(token) as hub:
        launch("zero3", tiny_model_path, tmp_path / "out", tmp_path / "results", 29591, "--push_to_hub",
               "tiny-fipo-zero3", env=hub_env(hub.url, token))
        repo = hub.repos["fipo-user/tiny-fipo-zero3"]
    assert len(repo.commits) >= 2  # the checkpoints during training (every_save) and the final push
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert name in repo.files, sorted(repo.files)
    card = repo.files["README.md"].decode()
    assert "FIPO hyperparameters" in card and "2603.19835" in card
    assert not any(name.startswith(("global_step", "_saving_", "_fipo_trl")) for name in repo.files)


def test_a_checkpoint_resumed_on_another_number_of_processes_warns_or_is_refused_as_its_format_calls_for(
        tiny_model_path, runs, tmp_path):
    # FSDP's sharded checkpoint reshards on load: it resumes on 3 processes, with the changed-settings warning
    fsdp = tmp_path / "fsdp"
    shutil.copytree(runs["fsdp2-sharded"][0], fsdp)
    shutil.rmtree(fsdp / "checkpoint-4")  # resume from checkpoint-2
    ranks = launch("fsdp2-sharded", tiny_model_path, fsdp, tmp_path / "fsdp-results", 29601, "--resume", processes=3)
    assert ranks[0]["num_processes"] == 3 and ranks[0]["global_step"] == 4
    assert "world_size: 2 -> 3 processes" in ranks[0]["stderr"]
    # a ZeRO checkpoint holds one optimizer partition per process: refused, naming both numbers
    zero = tmp_path / "zero3"
    shutil.copytree(runs["zero3"][0], zero)
    shutil.rmtree(zero / "checkpoint-4")
    refused = launch("zero3", tiny_model_path, zero, tmp_path / "zero-results", 29602, "--resume", processes=3,
                     fails=True)
    assert "a DeepSpeed ZeRO checkpoint saved by 2 processes, and this run has 3" in refused.stderr
    assert not (zero / "checkpoint-4").exists()  # nothing trained or saved


def test_the_gpu_reports_sharded_rows_read_a_run(runs, tmp_path):
    """benchmarks/gpu_report.py's sharded section makes this run on 1 GPU; its row reads the same record and files."""
    gpu_report = load_report_module()
    for strategy, engaged in (("fsdp2-full", "FSDP"), ("zero3", "DEEPSPEED")):
        output_dir, _ = runs[strategy]
        row, raw = gpu_report.sharded_run_summary(strategy, engaged, output_dir, output_dir.parent / "results")
        assert raw["ok"] and "| complete | saved whole | ok |" in row, row
    zero3, results = runs["zero3"][0], runs["zero3"][0].parent / "results"
    row, raw = gpu_report.sharded_run_summary("zero3", "FSDP", zero3, results)
    assert not raw["ok"] and row.endswith("**failed** |")  # the strategy did not engage: the row says so
    shutil.copytree(zero3, tmp_path / "out")
    shutil.rmtree(tmp_path / "out" / "final")
    row, raw = gpu_report.sharded_run_summary("zero3", "DEEPSPEED", tmp_path / "out", results)
    assert not raw["ok"] and "| missing |" in row
