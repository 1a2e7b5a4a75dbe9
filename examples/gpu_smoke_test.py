"""GPU smoke test: the compiled Triton kernels against the float64 reference, and FIPO training on CUDA with bf16,
Liger's layer kernels, vLLM generation (colocate, also with LoRA) and QLoRA (bitsandbytes), on the tiny offline
model. Run it on a GPU machine:

    python examples/gpu_smoke_test.py                 # every check whose requirements are installed
    python examples/gpu_smoke_test.py --only kernel   # one check: kernel | bf16 | liger | vllm | vllm-lora | qlora

Each check runs in its own process (Liger patches transformers' model classes process-wide), always WITHOUT
TRITON_INTERPRET (a test runner's interpreter setting must not turn the GPU check into a CPU one), and prints
"SMOKE OK <check>" or fails with a non-zero exit code. Every check asserts that the fused kernel ran compiled.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import subprocess
import sys
import tempfile

# The compiled kernel against the float64 reference, relative to max(1, |expected|) (docs/gpu.md, "Accuracy"):
# on the GPU tl.exp is ex2.approx(x * log2 e) and tl.exp2 is ex2.approx (~2^-22 relative each) where the CPU
# interpreter's numpy exp is correctly rounded. The log2(e) product alone costs |F| * 6e-8 relative on exp(F)
# (~4e-6 at |F| = 46); the approximate exp2 in the scan's decay factors repeats the same few inputs, so its errors
# add up along the scan instead of averaging out. Emulating both on the interpreter with a systematic 2^-22 (an
# upper bound: the interpreter scans a block sequentially, up to 256 combines deep, the GPU in a tree of ~11) moves
# F, f, A * f and the gradient by <= 3.5e-5 and the batch sum of F by 5.6e-5; random errors move them by <= 5e-6.
# 1e-4 holds the upper bound with a margin and still catches a wrong decision (>= 1e-3) and every count exactly.
COMPILED_TOLERANCE = 1e-4
# (variant, B, T) of the kernel check: many rows (the row variant), and few long rows in 256-1024-token chunks
KERNEL_CASES = (("row", 16, 3000), ("chunk", 8, 20000))
CHECKS = {
    "kernel": {},
    "bf16": {},
    "liger": {"use_liger_kernel": True},
    "vllm": {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.2},
    "vllm-lora": {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.2, "lora": True},
    "qlora": {"lora": True, "quantize_4bit": True},
}
REQUIRES = {"liger": "liger_kernel", "vllm": "vllm", "vllm-lora": "vllm", "qlora": "bitsandbytes"}


def environment_without_interpreter() -> dict:
    """This process's environment minus TRITON_INTERPRET: the checks must run the compiled kernels."""
    return {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


def compiled_kernel_count() -> int:
    """How many compiled variants of the fused kernels this process holds (0 when only the interpreter ran)."""
    from fipo_trl.kernels import fipo_triton

    kernels = (fipo_triton._fipo_kernel, fipo_triton._chunk_totals_kernel, fipo_triton._chunk_carries_kernel,
               fipo_triton._chunk_rows_kernel)
    return sum(len(caches[0]) for kernel in kernels for caches in getattr(kernel, "device_caches", {}).values())


def assert_compiled() -> None:
    from fipo_trl.kernels import fipo_triton

    assert fipo_triton.TRITON_INTERPRETED is False, "TRITON_INTERPRET=1: the Triton interpreter ran, not the GPU"
    assert compiled_kernel_count() > 0, "no compiled Triton kernel in this process"


def smoke_batch(B, T, seed, dtype):
    """Log-ratios up to ~+-1 (every clip fires), holes, right padding, an empty row, NaN at masked positions, a row
    the sequence filter drops; on CUDA."""
    import torch

    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    logps = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.15)
    mask[1] = False
    mask[3, :2] = True
    logps[3, :2] = old[3, :2] + 3.0  # two dual-clipped tokens (A < 0, ratio e^3 > 10): row 3 is dropped
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[3] = -adv[3].abs() - 0.1
    logps = torch.where(mask, logps, torch.nan)
    return [t.to(dtype).cuda() if t.is_floating_point() else t.cuda() for t in (logps, old, adv)] + [mask.cuda()]


def assert_close_to_reference(name, actual, expected):
    import torch

    actual, expected = torch.as_tensor(actual).double().cpu(), torch.as_tensor(expected).double().cpu()
    error = ((actual - expected).abs() / expected.abs().clamp(min=1)).max().item() if expected.numel() else 0.0
    assert error <= COMPILED_TOLERANCE, f"{name}: relative error {error:.3g} > {COMPILED_TOLERANCE}"
    return error


def run_kernel_check() -> None:
    """Both Triton variants, compiled, against the float64 reference: fp32 and bf16 inputs, with the loss and its
    gradient and weights only, every clip mode; counts and the sequence filter exactly."""
    import torch

    from fipo_trl.kernels import Hyperparameters, compute_triton
    from fipo_trl.kernels.naive import fipo_loss_naive

    worst = 0.0
    for variant, B, T in KERNEL_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            for clip_ratio, high_only in ((0.2, True), (0.2, False), (0.0, True)):
                h = Hyperparameters(clip_ratio=clip_ratio, clip_high_only=high_only)
                logps, old, adv, mask = smoke_batch(B, T, seed=T + int(clip_ratio * 10), dtype=dtype)
                ref = fipo_loss_naive(logps.cpu(), old.cpu(), adv.cpu(), mask.cpu(), **h._asdict())
                for with_loss in (True, False):
                    leaf = logps.detach().clone().requires_grad_(with_loss)
                    out = compute_triton(leaf, old, adv, mask, h, with_loss=with_loss, variant=variant)
                    pairs = {"future_kl": (out.future_kl, ref["future_kl"]), "weights": (out.weights, ref["w"]),
                             "weighted_advantages": (out.weighted_advantages, ref["weighted_advantages"])}
                    if with_loss:
                        out.loss.backward()
                        pairs["loss"] = (out.loss, ref["loss"])
                        pairs["gradient"] = (leaf.grad.float(), ref["grad_logp"])
                    for name, expected in ref["stats"].items():
                        actual = float(out.stats[name])
                        if name.startswith("n_") or math.isinf(expected):
                            assert actual == expected, (variant, name, actual, expected)
                        else:
                            pairs[name] = (actual, expected)
                    assert torch.equal(out.keep.cpu(), ref["seq_valid"] > 0), (variant, "keep")
                    for name, (actual, expected) in pairs.items():
                        if name == "gradient" and dtype == torch.bfloat16:
                            continue  # rounded to bf16 once more: tests/kernels check it with that allowance
                        worst = max(worst, assert_close_to_reference(f"{variant} {dtype} {name}", actual, expected))
    assert_compiled()
    print(f"SMOKE OK kernel on {torch.cuda.get_device_name()}: row and chunk variants compiled, largest relative "
          f"error {worst:.2e} (tolerance {COMPILED_TOLERANCE})", flush=True)


def run_check(name: str, output_dir: str) -> None:
    if name == "kernel":
        run_kernel_check()
        return
    import torch
    from peft import LoraConfig

    from fipo_trl import FIPOConfig, FIPOTrainer
    from fipo_trl.tools.tiny import build_tiny_model, digit_reward, tiny_prompt_dataset

    options = dict(CHECKS[name])
    lora = options.pop("lora", False)
    if options.pop("quantize_4bit", False):  # QLoRA: a 4-bit base model under the LoRA adapter
        from transformers import BitsAndBytesConfig

        options["model_init_kwargs"] = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)}
    model_path = build_tiny_model(f"{output_dir}/base-model")
    args = FIPOConfig(output_dir=f"{output_dir}/{name}", bf16=True, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=16, max_steps=4, learning_rate=1e-3, fipo_updates_per_generation=2,
                      report_to="none", logging_steps=1, save_strategy="no", **options)
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if lora else None
    trainer = FIPOTrainer(model=str(model_path), reward_funcs=digit_reward, args=args,
                          train_dataset=tiny_prompt_dataset(32), peft_config=peft_config)
    trainer.train()
    active = [h["fipo/active"] for h in trainer.state.log_history if "fipo/active" in h]
    assert trainer.state.global_step == 4 and max(active) > 0, active
    assert next(trainer.model.parameters()).is_cuda
    assert trainer.fipo_backend == "triton", trainer.fipo_backend  # the fused kernel, not the torch path
    assert_compiled()
    print(f"SMOKE OK {name} on {torch.cuda.get_device_name()}: fipo/active={active}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(CHECKS))
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    output_dir = cli.output_dir or tempfile.mkdtemp(prefix="fipo-gpu-smoke-")
    if cli.in_process:
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("TRITON_INTERPRET=1 is set: the checks must run the compiled kernels; unset it.")
            return 1
        run_check(cli.only, output_dir)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("No CUDA device: nothing to check.")
        return 1
    failed = []
    for name in [cli.only] if cli.only else list(CHECKS):
        if name in REQUIRES and importlib.util.find_spec(REQUIRES[name]) is None:
            print(f"SKIP {name}: {REQUIRES[name]} is not installed")
            continue
        run = subprocess.run([sys.executable, __file__, "--in-process", "--only", name, "--output_dir", output_dir],
                             env=environment_without_interpreter())
        if run.returncode != 0:
            failed.append(name)
    print("FAILED: " + ", ".join(failed) if failed else "SMOKE OK: all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
