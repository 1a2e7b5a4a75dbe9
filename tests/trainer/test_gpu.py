"""GPU smoke tests: FIPO training on CUDA through examples/gpu_smoke_test.py (bf16 with the fused Triton kernel,
Liger's layer kernels, vLLM colocate, vLLM + LoRA, QLoRA). Each check runs in its own process: Liger patches
transformers' model classes process-wide. Skipped without CUDA (and without liger-kernel / vLLM)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "gpu_smoke_test.py"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def has(module):
    return importlib.util.find_spec(module) is not None


@needs_cuda
@pytest.mark.parametrize("check", [
    "bf16",
    pytest.param("liger", marks=pytest.mark.skipif(not has("liger_kernel"), reason="needs liger-kernel")),
    pytest.param("vllm", marks=pytest.mark.skipif(not has("vllm"), reason="needs vLLM")),
    pytest.param("vllm-lora", marks=pytest.mark.skipif(not has("vllm"), reason="needs vLLM")),
    pytest.param("qlora", marks=pytest.mark.skipif(not has("bitsandbytes"), reason="needs bitsandbytes")),
])
def test_gpu_training(check, tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--only", check, "--output_dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"SMOKE OK {check}" in run.stdout
