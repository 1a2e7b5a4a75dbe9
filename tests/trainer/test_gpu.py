"""GPU smoke tests through examples/gpu_smoke_test.py: the compiled Triton kernels (both variants) against the
float64 reference, and FIPO training on CUDA (bf16 with the fused Triton kernel, Liger's layer kernels, vLLM
colocate, vLLM + LoRA, QLoRA). Each check runs in its own process (Liger patches transformers' model classes
process-wide) WITHOUT TRITON_INTERPRET, and asserts that the kernels ran compiled: tests/conftest.py only sets the
interpreter where CUDA is missing, and the smoke script drops it from its checks' environment anyway. Skipped
without CUDA (and without liger-kernel / vLLM / bitsandbytes); the guard against the interpreter runs everywhere."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_utils import load_report_module

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "gpu_smoke_test.py"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def has(module):
    return importlib.util.find_spec(module) is not None


def without_interpreter():
    return {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


@needs_cuda
@pytest.mark.parametrize("check", [
    "kernel",
    "bf16",
    pytest.param("liger", marks=pytest.mark.skipif(not has("liger_kernel"), reason="needs liger-kernel")),
    pytest.param("vllm", marks=pytest.mark.skipif(not has("vllm"), reason="needs vLLM")),
    pytest.param("vllm-lora", marks=pytest.mark.skipif(not has("vllm"), reason="needs vLLM")),
    pytest.param("qlora", marks=pytest.mark.skipif(not has("bitsandbytes"), reason="needs bitsandbytes")),
])
def test_gpu_training(check, tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--only", check, "--output_dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=1200, env=without_interpreter())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"SMOKE OK {check}" in run.stdout


@needs_cuda
def test_the_test_session_runs_compiled_kernels_on_a_gpu():
    """On a CUDA machine the test process itself (tests/kernels' CUDA checks) runs the compiled kernels too."""
    from fipo_trl.kernels import fipo_triton

    assert os.environ.get("TRITON_INTERPRET") != "1" and not fipo_triton.TRITON_INTERPRETED


@pytest.mark.slow
def test_the_smoke_checks_refuse_to_run_under_the_interpreter(tmp_path):
    """A check that found TRITON_INTERPRET=1 would test the CPU interpreter while claiming the GPU: it stops."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(SCRIPT), "--in-process", "--only", "kernel", "--output_dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 1 and "must run the compiled kernels" in run.stdout, run.stdout + run.stderr[-2000:]


def test_the_smoke_script_drops_the_interpreter_for_its_checks(monkeypatch):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_smoke_test
    finally:
        sys.path.remove(str(SCRIPT.parent))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    env = gpu_smoke_test.environment_without_interpreter()
    assert "TRITON_INTERPRET" not in env and env["PATH"] == os.environ["PATH"]


# --- benchmarks/gpu_report.py: the GPU table's one command ----------------------------------------------------------

REPORT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_report.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU exit")
def test_gpu_report_on_cpu_exits_at_once_with_one_clear_line(tmp_path):
    run = subprocess.run([sys.executable, str(REPORT), "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "GPU machine" in lines[0], run.stderr
    assert not list(tmp_path.iterdir())  # no report written


def test_gpu_report_device_names_and_peaks():
    report = load_report_module()
    assert report.device_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert report.device_slug("NVIDIA A100-SXM4-80GB") == "nvidia_a100_sxm4_80gb"
    assert report.device_slug("../../etc") == "etc" and report.device_slug("???") == "unknown_device"
    # the most specific entry wins: an H100 PCIe is not an H100 SXM, a GH200 not an H200
    assert report.peak_bandwidth("NVIDIA H100 80GB HBM3")[0] == 3.35e12
    assert report.peak_bandwidth("NVIDIA H100 PCIe")[0] == 2.0e12
    assert report.peak_bandwidth("NVIDIA H200")[0] == 4.8e12
    assert report.peak_bandwidth("NVIDIA GH200 480GB")[0] == 4.0e12
    assert report.peak_bandwidth("NVIDIA A100-SXM4-80GB")[0] == 2.039e12
    assert report.peak_bandwidth("NVIDIA A100-PCIE-40GB")[0] == 1.555e12
    # an unknown card: double data rate x bus width from its memory clock (kHz), else unknown
    peak, source = report.peak_bandwidth("Future GPU", memory_clock_khz=2_619_000, bus_width_bits=5120)
    assert abs(peak - 3.352e12) < 1e9 and "bus width" in source
    assert report.peak_bandwidth("Future GPU") == (None, "unknown")


def test_gpu_report_bytes_per_token():
    report = load_report_module()
    # fp32: log-probs 4 + 4, mask 1, F, f, A * f written 4 + 4 + 4
    assert report.single_pass_bytes(4) == 21 and report.single_pass_bytes(2) == 17
    assert report.single_pass_bytes(4, with_grad=True, per_token_advantages=True) == 29
    # the chunk variant reads log-probs and mask a second time (the chunk totals)
    assert report.single_pass_bytes(4, variant="chunk") == 30 and report.single_pass_bytes(2, variant="chunk") == 22


def test_gpu_report_model_and_budgets():
    report = load_report_module()
    h100 = dict(peak=3.35e12, multiprocessors=132)
    # few long rows: the row variant is latency-bound (1024-token blocks one after the other), the chunks are not
    row, chunk = (report.estimated_seconds(8, 1 << 20, v, **h100) for v in ("row", "chunk"))
    assert row == pytest.approx(1024 * report.ITERATION_SECONDS) and chunk < row / 10
    # many rows: both bandwidth-bound, and no variant beats STREAM_EFFICIENCY of the peak
    for variant in ("row", "chunk"):
        assert report.expected_fraction_of_peak(512, 16384, variant, **h100) <= report.STREAM_EFFICIENCY + 1e-12
    assert report.expected_fraction_of_peak(512, 16384, "row", **h100) == pytest.approx(report.STREAM_EFFICIENCY)
    # an isolated small call waits for its host side
    assert report.estimated_seconds(8, 8192, "row", host=True, **h100) == report.HOST_SECONDS["row"]
    # a section gets its own budget, capped by what is left of the overall one, never negative
    assert report.section_deadline(0.0, 450, "kernel", now=10.0) == 10.0 + report.SECTION_BUDGET_S["kernel"]
    assert report.section_deadline(0.0, 450, "trainer", now=400.0) == 450.0
    assert report.section_deadline(0.0, 450, "vllm", now=500.0) == 500.0
