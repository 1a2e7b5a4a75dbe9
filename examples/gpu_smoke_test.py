"""GPU smoke test: FIPO training on CUDA with bf16, Liger's layer kernels, vLLM generation (colocate, also with
LoRA) and QLoRA (bitsandbytes), on the tiny offline model. Run it on a GPU machine:

    python examples/gpu_smoke_test.py                 # every check whose requirements are installed
    python examples/gpu_smoke_test.py --only vllm     # one check: bf16 | liger | vllm | vllm-lora | qlora

Each check runs in its own process (Liger patches transformers' model classes process-wide) and prints
"SMOKE OK <check>" or fails with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile

CHECKS = {
    "bf16": {},
    "liger": {"use_liger_kernel": True},
    "vllm": {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.2},
    "vllm-lora": {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.2, "lora": True},
    "qlora": {"lora": True, "quantize_4bit": True},
}
REQUIRES = {"liger": "liger_kernel", "vllm": "vllm", "vllm-lora": "vllm", "qlora": "bitsandbytes"}


def run_check(name: str, output_dir: str) -> None:
    import torch
    from peft import LoraConfig

    from fipo_trl import FIPOConfig, FIPOTrainer
    from fipo_trl._tiny import build_tiny_model, digit_reward, tiny_prompt_dataset

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
    print(f"SMOKE OK {name} on {torch.cuda.get_device_name()}: fipo/active={active}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(CHECKS))
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    output_dir = cli.output_dir or tempfile.mkdtemp(prefix="fipo-gpu-smoke-")
    if cli.in_process:
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
        run = subprocess.run([sys.executable, __file__, "--in-process", "--only", name, "--output_dir", output_dir])
        if run.returncode != 0:
            failed.append(name)
    print("FAILED: " + ", ".join(failed) if failed else "SMOKE OK: all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
