"""The whole GPU table in one command: kernel bandwidth, three algorithms, trainer step, vLLM.

    python benchmarks/gpu_report.py [--out benchmarks/results] [--budget_s 450]

On the device tool (no network there): scripts/prepare_device_wheels.sh here, then scripts/gpu_report_on_device.sh
there in one call (benchmarks/README.md).

Writes <out>/gpu_<device>.md (and .json, the raw numbers), rewritten after each section, so a run cut short keeps
what it measured. Sections, each with its own time budget (capped by what is left of --budget_s) and its own
try/except (an error is written into the report and the next section runs):

1. kernel: the Triton kernels' time (``triton.testing.do_bench``, median) for the weights-only call the trainer makes
   (``fipo_weights``' compute: F, f, A * f, keep, stats) at B * T in {64K, 1M, 8M} tokens for B = 8 and B = 512,
   with the row and the chunk variant forced, fp32 and bf16 log-probs; achieved bandwidth counts the bytes a single
   pass must move (docs/gpu.md) against the card's peak.
2. algorithms: loss forward + backward on the same GPU: the Triton path, the torch path (kernels/fipo_torch.py) and
   the official chunked decay-matrix algorithm (kernels/naive.py ``official_fipo_loss``, up to T = 16K: it is
   O(T^2)), fp32.
3. trainer: FIPOTrainer / GRPOTrainer (DAPO loss) update-step time ratio on a ~0.5B-parameter model built locally
   (Qwen2.5-0.5B's transformer body as a Llama config, random init, the tiny word-level tokenizer, no download),
   bf16, without and with ``use_liger_kernel`` (only when liger-kernel is installed), each in its own process
   (Liger patches transformers' classes process-wide); steps timed as benchmarks/bench_trainer_step.py does.
4. sharded: one FIPO run (4 steps, checkpoints at 2 and 4, the final model saved whole) under FSDP2 and one under
   DeepSpeed ZeRO-3, each through ``accelerate launch`` with our config on 1 process (tests/scripts/sharded_run.py,
   which CI runs on 2 CPU processes): the strategy engaged, FIPO active, checkpoint-4 complete by its contents.
5. vllm: the vLLM colocate tests (tests/vllm_colocate, which CI runs on the CPU), when vLLM is installed.

Without a CUDA device it exits at once with status 2 and one line saying so, before importing torch where it can.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
NO_CUDA_EXIT = 2
TOKEN_COUNTS = (1 << 16, 1 << 20, 1 << 23)  # B * T: 64K, 1M, 8M tokens
BATCH_SIZES = (8, 512)
OFFICIAL_MAX_T = 16384  # the official algorithm is O(T^2) in time: longer rows are skipped
SECTION_BUDGET_S = {"kernel": 60, "algorithms": 90, "sharded": 100, "trainer": 210, "vllm": 120}
# The sharded section: one FIPO run per strategy through `accelerate launch` with our config, on this one GPU
SHARDED_STRATEGIES = {"FSDP2": ("fsdp2.yaml", "FSDP", "accelerate"), "DeepSpeed ZeRO-3": (
    "deepspeed_zero3.yaml", "DEEPSPEED", "deepspeed")}

# HBM peak bandwidth by device name (vendor data sheets), most specific first; matched on the lowercased name.
PEAK_BANDWIDTH = (
    ("gh200", 4.0e12),
    ("h200", 4.8e12),
    ("h100 nvl", 3.9e12),
    ("h100 pcie", 2.0e12),
    ("h100", 3.35e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h800", 3.35e12),
    ("a100-sxm4-80gb", 2.039e12),
    ("a100 80gb pcie", 1.935e12),
    ("a100", 1.555e12),  # 40 GB
    ("b200", 8.0e12),
    ("l40s", 0.864e12),
    ("a10g", 0.6e12),
    ("l4", 0.3e12),
)


# --- pure helpers (unit-tested in tests/trainer/test_gpu.py) ---------------------------------------------------------


def cuda_missing_reason() -> str | None:
    """Why there is no CUDA device (None when there is one): device files first, so a CPU machine never pays for
    importing torch."""
    if not (Path("/proc/driver/nvidia").exists() or list(Path("/dev").glob("nvidia[0-9]*"))):
        return "no NVIDIA driver or device (/proc/driver/nvidia, /dev/nvidia*)"
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)"
    return None


def device_slug(name: str) -> str:
    """A file-name-safe form of a device name: "NVIDIA H100 80GB HBM3" -> "nvidia_h100_80gb_hbm3"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:60] or "unknown_device"


def peak_bandwidth(name: str, memory_clock_khz: int | None = None, bus_width_bits: int | None = None):
    """(bytes/s or None, where the figure comes from): the data-sheet table by name, else double data rate x bus
    width from the device's reported memory clock, else unknown."""
    lowered = name.lower()
    for key, peak in PEAK_BANDWIDTH:
        if key in lowered:
            return peak, f"data sheet ({key})"
    if memory_clock_khz and bus_width_bits:
        return 2 * memory_clock_khz * 1e3 * bus_width_bits / 8, "memory clock x bus width x 2"
    return None, "unknown"


def bytes_per_token(input_bytes: int, *, with_grad: bool = False, per_token_advantages: bool = False,
                    variant: str = "row") -> dict[str, float]:
    """Bytes a kernel call moves per token, by item: the inputs read (log-probs and old log-probs of
    ``input_bytes`` each, the 1-byte mask, per-token fp32 advantages), the fp32 outputs written (F, f, A * f, and
    the gradient when asked for), and for the chunk variant the chunk-totals pass's second read of log-probs and
    mask. Per-row and per-chunk items (stats rows, carries, keep) are < 0.5 B/token at chunks of >= 256 tokens and
    left out."""
    items = {"logps": input_bytes, "old_logps": input_bytes, "mask": 1}
    if per_token_advantages:
        items["advantages"] = 4
    items.update({"future_kl (write)": 4, "weights (write)": 4, "weighted_advantages (write)": 4})
    if with_grad:
        items["gradient (write)"] = 4
    if variant == "chunk":
        items["chunk totals: logps, old_logps, mask again"] = 2 * input_bytes + 1
    return items


def single_pass_bytes(input_bytes: int, **options) -> float:
    """The least a call must move per token: every input read once, every output written once."""
    return sum(bytes_per_token(input_bytes, **options).values())


def backward_bytes_per_token(input_bytes: int) -> dict[str, float]:
    """Bytes the loss's backward moves per token: it reads the stored unscaled gradient (fp32) and writes the
    gradient of the log-probs in their dtype (kernels/common.py ``LossWithStoredGradient``)."""
    return {"unscaled gradient (read)": 4, "gradient of logps (write)": input_bytes}


# The performance model of docs/gpu.md ("Bandwidth estimate"). Assumed, not measured (no GPU was available when it
# was written): the report prints it next to the measurement so the two can be compared.
ITERATION_SECONDS = 1.2e-6  # one block of a program: a DRAM round trip (~0.7 us loaded) + scan, reductions, stores
STREAM_EFFICIENCY = 0.8  # the share of peak a well-occupied streaming kernel reaches
HOST_SECONDS = {"row": 60e-6, "chunk": 100e-6}  # Python + launches + the stats reduction per call
WARPS_PER_SM = 16  # resident at <= 128 registers per thread (tests/kernels/test_triton_compile.py)


def estimated_seconds(B: int, T: int, variant: str, *, peak: float, multiprocessors: int, input_bytes: int = 4,
                      host: bool = False) -> float:
    """Modelled GPU time of one weights-only call: the larger of moving its bytes at STREAM_EFFICIENCY x peak and
    the programs' sequential block latency (in waves of resident programs). ``host``: the time of an isolated call,
    which also waits for its host side (HOST_SECONDS; inside a training step the host runs ahead of the GPU and
    this overlaps other work)."""
    from fipo_trl.kernels.fipo_triton import DEFAULT_BLOCK_SIZE, chunk_size_for, warps_for

    if variant == "row":
        block = min(DEFAULT_BLOCK_SIZE, 1 << max(4, (T - 1).bit_length()))
        programs, iterations = B, math.ceil(T / block)
    else:
        block = chunk_size_for(B, T, multiprocessors)
        programs, iterations = B * math.ceil(T / block), 1
    resident = multiprocessors * max(1, WARPS_PER_SM // warps_for(block))
    waves = math.ceil(programs / resident)
    latency = waves * iterations * ITERATION_SECONDS
    if variant == "chunk":  # the chunk totals pass (as many programs), then carries and rows (a block each per row)
        latency += (waves + 2) * ITERATION_SECONDS
    transfer = B * T * single_pass_bytes(input_bytes, variant=variant) / (STREAM_EFFICIENCY * peak)
    return max(latency, transfer, HOST_SECONDS[variant] if host else 0.0)


def expected_fraction_of_peak(B: int, T: int, variant: str, *, peak: float, multiprocessors: int,
                              input_bytes: int = 4, host: bool = False) -> float:
    """The modelled single-pass bandwidth (bytes a single pass must move / modelled time) as a share of peak."""
    seconds = estimated_seconds(B, T, variant, peak=peak, multiprocessors=multiprocessors, input_bytes=input_bytes,
                                host=host)
    return B * T * single_pass_bytes(input_bytes) / seconds / peak


def section_deadline(started: float, overall_budget_s: float, section: str, now: float | None = None) -> float:
    """When a section must stop: its own budget, capped by what is left of the overall one."""
    now = time.monotonic() if now is None else now
    left = started + overall_budget_s - now
    return now + max(0.0, min(SECTION_BUDGET_S[section], left))


# --- the report ----------------------------------------------------------------------------------------------------


class Report:
    """The markdown report and its raw numbers, rewritten to disk after every section."""

    def __init__(self, out_dir: Path, device: str, header: list[str]):
        self.path = out_dir / f"gpu_{device_slug(device)}.md"
        self.header, self.sections, self.raw = header, [], {}
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, title: str, lines: list[str], raw=None) -> None:
        self.sections.append([f"## {title}", "", *lines, ""])
        self.raw[title] = raw
        self.write()

    def write(self) -> None:
        text = "\n".join(self.header + [line for section in self.sections for line in section])
        self.path.write_text(text + "\n")
        self.path.with_suffix(".json").write_text(json.dumps(self.raw, indent=1, default=str) + "\n")


def run_section(report: Report, title: str, function, *args) -> None:
    started = time.monotonic()
    try:
        lines, raw = function(*args)
    except Exception as error:  # the report records it and goes on: one broken section must not lose the others
        lines = [f"**failed** after {time.monotonic() - started:.0f} s: `{type(error).__name__}: {error}`", "",
                 "```", *traceback.format_exc().splitlines()[-15:], "```"]
        raw = {"error": repr(error)}
    else:
        lines.append(f"(section time {time.monotonic() - started:.0f} s)")
    print(f"[gpu_report] {title}: done in {time.monotonic() - started:.0f} s", flush=True)
    report.add(title, lines, raw)


def make_inputs(B: int, T: int, dtype, seed: int = 0):
    """Log-probs with a typical policy drift, 90 % response tokens, (B,) advantages; on the GPU."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    old = -torch.rand(B, T, generator=g, device="cuda") * 3
    logps = old + torch.randn(B, T, generator=g, device="cuda") * 0.05
    mask = torch.rand(B, T, generator=g, device="cuda") < 0.9
    advantages = torch.randn(B, generator=g, device="cuda")
    return logps.to(dtype), old.to(dtype), advantages, mask


def kernel_section(deadline: float, peak: float | None, multiprocessors: int):
    import torch
    from triton.testing import do_bench, do_bench_cudagraph

    from fipo_trl.kernels import DEFAULTS
    from fipo_trl.kernels.fipo_triton import compute_triton

    lines = ["Weights only (what FIPOTrainer computes per update). GPU time: the call replayed as a CUDA graph "
             "(`do_bench_cudagraph`, median: kernels only, as inside a training step where the host runs ahead); "
             "call time: `do_bench` (median), an isolated call with its host side (allocations, launches, the stats "
             "reduction). GB/s = single-pass bytes (every input read once, every output written once: 21 B/token "
             "fp32, 17 B bf16) / GPU time; the chunk variant moves 9 (5) B/token more. Model: docs/gpu.md's "
             "estimate for this card (`estimated_seconds`, assumed constants).", "",
             "| B | T | inputs | variant | GPU time (us) | GB/s | % of peak | model GPU (us) | call time (us) | "
             "model call (us) |", "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    raw = []
    for B in BATCH_SIZES:
        for tokens in TOKEN_COUNTS:
            T = tokens // B
            for dtype in (torch.float32, torch.bfloat16):
                inputs = make_inputs(B, T, dtype)
                name = str(dtype).removeprefix("torch.")
                for variant in ("row", "chunk"):
                    if time.monotonic() > deadline:
                        lines.append(f"| {B} | {T} | {name} | {variant} | skipped: section budget |" + " |" * 5)
                        continue

                    def call(inputs=inputs, variant=variant):
                        return compute_triton(*inputs, DEFAULTS, with_loss=False, variant=variant)

                    call_ms = do_bench(call, return_mode="median")
                    try:
                        gpu_ms = do_bench_cudagraph(call, return_mode="median")
                    except Exception as error:  # e.g. a capture the driver refuses: keep the call time
                        print(f"[gpu_report] CUDA graph timing failed: {error!r}", flush=True)
                        gpu_ms = math.nan
                    rate = tokens * single_pass_bytes(dtype.itemsize) / (gpu_ms * 1e-3)
                    share, model_gpu, model_call = "?", "?", "?"
                    if peak:
                        share = f"{100 * rate / peak:.1f}"
                        options = dict(peak=peak, multiprocessors=multiprocessors, input_bytes=dtype.itemsize)
                        model_gpu = f"{estimated_seconds(B, T, variant, **options) * 1e6:.1f}"
                        model_call = f"{estimated_seconds(B, T, variant, host=True, **options) * 1e6:.1f}"
                    lines.append(f"| {B} | {T} | {name} | {variant} | {gpu_ms * 1e3:.1f} | {rate / 1e9:.0f} | "
                                 f"{share} | {model_gpu} | {call_ms * 1e3:.1f} | {model_call} |")
                    raw.append({"B": B, "T": T, "dtype": name, "variant": variant, "gpu_ms": gpu_ms,
                                "call_ms": call_ms, "bytes_per_s": rate})
                del inputs
    torch.cuda.empty_cache()
    return lines, raw


def algorithms_section(deadline: float):
    import torch
    from triton.testing import do_bench

    from fipo_trl.kernels import DEFAULTS, compute_torch, compute_triton
    from fipo_trl.kernels.naive import official_fipo_loss

    def triton_step(logps, old, adv, mask):
        leaf = logps.detach().requires_grad_()
        compute_triton(leaf, old, adv, mask, DEFAULTS).loss.backward()

    def torch_step(logps, old, adv, mask):
        leaf = logps.detach().requires_grad_()
        compute_torch(leaf, old, adv, mask, DEFAULTS).loss.backward()

    def official_step(logps, old, adv, mask):
        leaf = logps.detach().requires_grad_()
        official_fipo_loss(leaf, old, adv, mask).backward()

    methods = {"Triton (fused kernel)": triton_step, "torch path": torch_step,
               "official chunked algorithm": official_step}
    lines = ["Loss forward + backward, fp32, official hyperparameters, median of `do_bench` (ms); ratios against the "
             "Triton path.", "", "| B | T | " + " | ".join(methods) + " | torch / Triton | official / Triton |",
             "|---:|---:|" + "---:|" * (len(methods) + 2)]
    raw = []
    for B in BATCH_SIZES:
        for tokens in TOKEN_COUNTS:
            T = tokens // B
            inputs = make_inputs(B, T, torch.float32)
            times = {}
            for name, step in methods.items():
                if name.startswith("official") and T > OFFICIAL_MAX_T:
                    times[name] = "skipped: O(T^2)"
                elif time.monotonic() > deadline:
                    times[name] = "skipped: section budget"
                else:
                    times[name] = do_bench(lambda step=step, inputs=inputs: step(*inputs), return_mode="median")
            del inputs
            torch.cuda.empty_cache()
            fused = times["Triton (fused kernel)"]

            def ratio(name, fused=fused, times=times):
                value = times[name]
                return f"{value / fused:.1f}x" if isinstance(value, float) and isinstance(fused, float) else ""

            cells = [f"{v:.3f}" if isinstance(v, float) else v for v in times.values()]
            lines.append(f"| {B} | {T} | " + " | ".join(cells) + f" | {ratio('torch path')} | "
                         f"{ratio('official chunked algorithm')} |")
            raw.append({"B": B, "T": T, **times})
    return lines, raw


# --- trainer step, in a child process per Liger setting --------------------------------------------------------------

# Qwen2.5-0.5B's transformer body (358M parameters without its 151K-token embedding) as a Llama config: the tiny
# word-level tokenizer's ~90 tokens replace the vocabulary (a Llama config keeps transformers from swapping in a BPE
# tokenizer on reload, fipo_trl/tools/tiny.py).
HALF_BILLION_BODY = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=1024, rope_theta=1e6, rms_norm_eps=1e-6)
TRAINER_COMPLETION_LENGTH = 128
TRAINER_STEPS = 8  # 2 generation batches of 4 updates; the first is warm-up


def build_half_billion_model(output_dir: Path) -> tuple[Path, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fipo_trl.tools.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         **HALF_BILLION_BODY)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir, sum(p.numel() for p in model.parameters())


def trainer_child(use_liger: bool, result_path: Path, rounds: int) -> None:
    """One Liger setting: FIPOTrainer and GRPOTrainer alternating for ``rounds`` rounds; writes JSON."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_trainer_step import StepTimer
    from trl import GRPOConfig, GRPOTrainer

    from fipo_trl import FIPOConfig, FIPOTrainer
    from fipo_trl.tools.tiny import digit_reward, tiny_prompt_dataset

    scratch = Path(tempfile.mkdtemp(prefix="fipo-gpu-report-"))
    model_path, n_parameters = build_half_billion_model(scratch / "model")
    pairs = [("GRPOTrainer (dapo)", GRPOTrainer, GRPOConfig), ("FIPOTrainer", FIPOTrainer, FIPOConfig)]
    medians, ratios = {name: [] for name, *_ in pairs}, []
    for round_ in range(rounds):
        this_round = {}
        for name, trainer_cls, config_cls in pairs if round_ % 2 == 0 else pairs[::-1]:
            args = config_cls(
                output_dir=str(scratch / f"{name}-{round_}"), bf16=True, per_device_train_batch_size=8,
                num_generations=8, max_completion_length=TRAINER_COMPLETION_LENGTH, max_steps=TRAINER_STEPS,
                learning_rate=1e-6, steps_per_generation=4, loss_type="dapo", delta=10.0, epsilon_high=0.28,
                beta=0.0, vllm_importance_sampling_correction=False, report_to="none", logging_steps=1,
                save_strategy="no", seed=0, disable_tqdm=True, use_liger_kernel=use_liger,
                generation_kwargs={"min_new_tokens": TRAINER_COMPLETION_LENGTH},  # same shapes in both trainers
            )
            timer = StepTimer()
            trainer = trainer_cls(model=str(model_path), reward_funcs=digit_reward, args=args,
                                  train_dataset=tiny_prompt_dataset(64), callbacks=[timer])
            trainer.train()
            updating = [t for i, t in enumerate(timer.times) if i % 4 != 0][3:]  # drop the first batch (warm-up)
            this_round[name] = statistics.median(updating)
            medians[name].append(this_round[name])
            del trainer
        ratios.append(this_round["FIPOTrainer"] / this_round["GRPOTrainer (dapo)"])
    result_path.write_text(json.dumps({"parameters": n_parameters, "medians_s": medians, "ratios": ratios}))


def trainer_section(deadline: float):
    settings = [False] + ([True] if importlib.util.find_spec("liger_kernel") else [])
    lines = [f"Qwen2.5-0.5B-shaped Llama body, random init, bf16 autocast, 8 completions of exactly "
             f"{TRAINER_COMPLETION_LENGTH} tokens, 4 updates per generation batch, {TRAINER_STEPS} steps per run; "
             "median update-only step (first generation batch dropped) per run, runs alternating the trainers' order.",
             "", "| use_liger_kernel | parameters | GRPOTrainer (dapo) step (ms) | FIPOTrainer step (ms) | "
             "FIPO / GRPO (median of rounds) | per round |", "|---|---:|---:|---:|---:|---|"]
    raw = {}
    for position, use_liger in enumerate(settings):
        left = deadline - time.monotonic()
        timeout = left / (len(settings) - position)  # an even share of what is left
        if timeout < 30:
            lines.append(f"| {use_liger} | skipped: section budget | | | | |")
            continue
        with tempfile.TemporaryDirectory() as scratch:
            result_path = Path(scratch) / "result.json"
            command = [sys.executable, __file__, "--internal-trainer", str(int(use_liger)), "--internal-result",
                       str(result_path)]
            try:
                run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
            except subprocess.TimeoutExpired:
                lines.append(f"| {use_liger} | timed out after {timeout:.0f} s | | | | |")
                continue
            if run.returncode != 0 or not result_path.exists():
                tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
                lines.append(f"| {use_liger} | failed (exit {run.returncode}): `{tail[0][:200]}` | | | | |")
                raw[f"liger={use_liger}"] = {"error": (run.stderr or run.stdout)[-3000:]}
                continue
            result = json.loads(result_path.read_text())
        raw[f"liger={use_liger}"] = result
        grpo, fipo = (statistics.median(result["medians_s"][name]) for name in ("GRPOTrainer (dapo)", "FIPOTrainer"))
        lines.append(f"| {use_liger} | {result['parameters'] / 1e6:.0f}M | {grpo * 1e3:.1f} | {fipo * 1e3:.1f} | "
                     f"**{statistics.median(result['ratios']):.3f}x** | "
                     f"{', '.join(f'{r:.3f}' for r in result['ratios'])} |")
    if len(settings) == 1:
        lines.append("")
        lines.append("use_liger_kernel=True: skipped (liger-kernel is not installed).")
    return lines, raw


def sharded_run_summary(strategy: str, engaged: str, output_dir: Path, result_dir: Path) -> tuple[str, dict]:
    """One table row from a sharded_run.py run: its rank-0 record and what it left in output_dir."""
    from fipo_trl.safety.checkpoint_files import checkpoint_problems

    record = json.loads((result_dir / "rank0.json").read_text())
    problems = checkpoint_problems(str(output_dir / "checkpoint-4"))
    final = any((output_dir / "final" / name).is_file() for name in ("model.safetensors", "pytorch_model.bin"))
    ok = (engaged in record["distributed_type"] and record["global_step"] == 4 and max(record["active"]) > 0
          and not problems and final)
    row = (f"| {strategy} | {record['distributed_type']} | {record['global_step']} | "
           f"{', '.join(f'{a:.2f}' for a in record['active'])} | {', '.join(f'{x:.4f}' for x in record['losses'])} | "
           f"{'complete' if not problems else '; '.join(problems)} | {'saved whole' if final else 'missing'} | "
           f"{'ok' if ok else '**failed**'} |")
    return row, {"ok": ok, **{key: record[key] for key in ("distributed_type", "global_step", "active", "losses")}}


def sharded_section(deadline: float):
    """FSDP2 and ZeRO-3 executed on this GPU: the run CI makes on 2 CPU processes, here on 1 GPU process."""
    from fipo_trl.tools.tiny import build_tiny_model

    lines = ["FIPO, 4 steps, through `accelerate launch --config_file examples/accelerate_configs/<config> "
             "--num_processes 1 tests/scripts/sharded_run.py` (CI runs it on 2 CPU processes: docs/distributed.md).",
             "", "| strategy | accelerate's distributed type | steps | fipo/active | losses | checkpoint-4 | final "
             "model | |", "|---|---|---:|---|---|---|---|---|"]
    raw = {}
    with tempfile.TemporaryDirectory() as scratch:
        model = str(build_tiny_model(Path(scratch) / "model"))
        for index, (strategy, (config, engaged, needs)) in enumerate(SHARDED_STRATEGIES.items()):
            if importlib.util.find_spec(needs) is None:
                lines.append(f"| {strategy} | skipped: {needs} is not installed | | | | | | |")
                continue
            output_dir, result_dir = Path(scratch) / f"out{index}", Path(scratch) / f"results{index}"
            result_dir.mkdir()
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(ROOT / "examples" / "accelerate_configs" / config), "--num_processes", "1",
                       "--mixed_precision", "no", "--main_process_port", str(29561 + index),
                       str(ROOT / "tests" / "scripts" / "sharded_run.py"), model, str(output_dir), str(result_dir)]
            timeout = deadline - time.monotonic()
            started = time.monotonic()
            try:
                run = subprocess.run(command, capture_output=True, text=True, timeout=max(timeout, 1), cwd=ROOT,
                                     env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
            except subprocess.TimeoutExpired:
                lines.append(f"| {strategy} | timed out after {timeout:.0f} s | | | | | | **failed** |")
                raw[strategy] = {"timeout_s": timeout}
                continue
            if run.returncode != 0:
                lines.append(f"| {strategy} | failed (exit {run.returncode}) | | | | | | **failed** |")
                lines += ["", "```", *(run.stdout + run.stderr).strip().splitlines()[-15:], "```", ""]
                raw[strategy] = {"returncode": run.returncode}
                continue
            row, raw[strategy] = sharded_run_summary(strategy, engaged, output_dir, result_dir)
            lines.append(row)
            raw[strategy]["seconds"] = time.monotonic() - started
    return lines, raw


def vllm_section(deadline: float):
    """The vLLM colocate tests CI runs on the CPU (tests/vllm_colocate), here on the GPU; the 2-process one needs 2
    GPUs. Server mode is not run: TRL syncs weights to the server over NCCL, which cannot pair two processes on one
    GPU."""
    import torch

    if importlib.util.find_spec("vllm") is None:
        return ["skipped: vLLM is not installed (the device image has none, and its CUDA wheel is far over the 64 MiB "
                "the device tool carries)."], {"skipped": "vllm not installed"}
    timeout = deadline - time.monotonic()
    gpus = torch.cuda.device_count()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "vllm_colocate")]
    if gpus < 2:
        command += ["-k", "not two_processes"]
    started = time.monotonic()
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=max(timeout, 1), cwd=ROOT,
                             env={**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
                                  "FIPO_REQUIRE_VLLM": "1"})
    except subprocess.TimeoutExpired:
        return [f"vLLM colocate tests (tests/vllm_colocate): timed out after {timeout:.0f} s."], {"timeout_s": timeout}
    summary = (run.stdout.strip().splitlines() or ["(no output)"])[-1]
    status = "ok" if run.returncode == 0 else f"failed (exit {run.returncode})"
    which = "" if gpus >= 2 else ", 1 GPU: without the 2-process test"
    lines = [f"vLLM colocate tests (`FIPO_REQUIRE_VLLM=1 pytest tests/vllm_colocate`{which}): {status}, {summary}, in "
             f"{time.monotonic() - started:.0f} s.",
             "", "Server mode: not run (TRL's NCCL weight sync needs the server on a GPU of its own)."]
    if run.returncode != 0:
        lines += ["", "```", *(run.stdout + run.stderr).strip().splitlines()[-20:], "```"]
    return lines, {"returncode": run.returncode, "summary": summary, "gpus": gpus}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for gpu_<device>.md and .json")
    parser.add_argument("--budget_s", type=float, default=450, help="overall time budget in seconds")
    parser.add_argument("--sections", nargs="+", default=list(SECTION_BUDGET_S), choices=list(SECTION_BUDGET_S))
    parser.add_argument("--trainer_rounds", type=int, default=2)
    parser.add_argument("--internal-trainer", type=int, choices=[0, 1], help=argparse.SUPPRESS)
    parser.add_argument("--internal-result", type=Path, help=argparse.SUPPRESS)
    cli = parser.parse_args(argv)
    started = time.monotonic()
    reason = cuda_missing_reason()
    if reason:
        print(f"gpu_report: no CUDA device: {reason}. Run it on a GPU machine.", file=sys.stderr)
        return NO_CUDA_EXIT
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the compiled kernels are measured
    if cli.internal_trainer is not None:
        trainer_child(bool(cli.internal_trainer), cli.internal_result, cli.trainer_rounds)
        return 0

    import torch
    import triton

    from fipo_trl.kernels import fipo_triton

    assert not fipo_triton.TRITON_INTERPRETED
    device = torch.cuda.get_device_name()
    properties = torch.cuda.get_device_properties(0)
    peak, peak_source = peak_bandwidth(device, getattr(properties, "memory_clock_rate", None),
                                       getattr(properties, "memory_bus_width", None))
    peak_text = f"{peak / 1e12:.2f} TB/s ({peak_source})" if peak else "unknown"
    header = [f"# GPU report: {device}", "",
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {device}, "
              f"{properties.multi_processor_count} SMs, {properties.total_memory / 2**30:.0f} GiB; peak memory "
              f"bandwidth {peak_text}; torch {torch.__version__}, CUDA {torch.version.cuda}, triton "
              f"{triton.__version__}; command `python benchmarks/gpu_report.py --budget_s {cli.budget_s:.0f}`.", ""]
    report = Report(cli.out, device, header)
    sections = {"kernel": ("Kernel bandwidth",
                           lambda d: kernel_section(d, peak, properties.multi_processor_count)),
                "algorithms": ("Three algorithms, same GPU", algorithms_section),
                "sharded": ("FSDP2 and DeepSpeed ZeRO-3 on this GPU", sharded_section),
                "trainer": ("Trainer step: FIPOTrainer / GRPOTrainer", trainer_section),
                "vllm": ("vLLM colocate", vllm_section)}
    for key in cli.sections:
        title, function = sections[key]
        deadline = section_deadline(started, cli.budget_s, key)
        if deadline <= time.monotonic():
            report.add(title, ["skipped: the overall budget (--budget_s) is spent."])
            continue
        run_section(report, title, function, deadline)
    print(f"[gpu_report] wrote {report.path} in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
