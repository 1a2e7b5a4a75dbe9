"""Forward+backward time and peak extra memory of the FIPO loss vs the official algorithm and TRL's DAPO loss.

    python benchmarks/bench_fipo_loss.py [--lengths 2048 8192 20480 32768] [--repeats 20] [--max-official-length 20480]
        [--results-dir benchmarks/results]

Methods, B = 8, fp32, each forward+backward with the metrics where the method has them:
  (a) official: the official algorithm (kernels/naive.py ``official_fipo_loss``): chunked decay-matrix matmul
      (chunk 128) on a log-ratio that still requires grad (docs/algorithm.md §1.3)
  (b) official, detached: the same on a detached log-ratio
  (c) fipo_loss(backend="torch"): our O(T) torch path (validation and metrics included)
  (c') fipo_loss(backend="c"): the fused C kernel, what fipo_loss runs on CPU (validation and metrics included;
       its own memory outside torch, 8 KiB of stack, is not in the probe)
  (d) fipo_loss(backend="triton"): the fused kernel (CUDA only)
  (e) DAPO: TRL's plain token-level clipped loss on the same tensors (the floor)
Memory: torch.cuda.max_memory_allocated on CUDA; on CPU, a TorchDispatchMode probe that tracks the storages the
step creates (the peak of live bytes, inputs excluded). Writes <results-dir>/fipo_loss_<device>.md and .png.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from fipo_trl import fipo_loss
from fipo_trl.kernels import c_kernel_usable, triton_usable
from fipo_trl.kernels.naive import official_fipo_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' memory probe, shared
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_report's bytes-per-token count, shared
from allocation_probe import AllocationProbe  # noqa: E402
from gpu_report import backward_bytes_per_token, bytes_per_token, single_pass_bytes  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def make_batch(B, T, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logps = old + torch.randn(B, T, generator=g) * 0.05  # typical drift between pi_theta and pi_old
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    adv = torch.randn(B, generator=g)
    return [t.to(device) for t in (logps, old, adv, mask)]


def dapo_loss(logps, old, adv, mask, eps_low=0.2, eps_high=0.28):
    """TRL's token-level (dapo) clipped surrogate without FIPO weights."""
    coef = torch.exp(logps - old)
    per_token = -torch.min(coef * adv[:, None], torch.clamp(coef, 1 - eps_low, 1 + eps_high) * adv[:, None])
    maskf = mask.float()
    return (per_token * maskf).sum() / maskf.sum().clamp(min=1.0)


def run_step(method, batch):
    logps, old, adv, mask = batch
    leaf = logps.detach().clone().requires_grad_()
    if method.startswith("official"):  # the 32B recipe, the official defaults
        loss = official_fipo_loss(leaf, old, adv, mask, detach_log_ratio=method == "official_detached")
    elif method in ("fipo_torch", "fipo_triton", "fipo_c"):
        out = fipo_loss(leaf, old, adv, mask, backend=method.split("_")[1])
        loss = out.loss
        out.metrics  # noqa: B018 (formed on first access: part of the cost)
    else:
        loss = dapo_loss(leaf, old, adv, mask)
    loss.backward()
    return leaf.grad


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_method(method, batch, device, repeats):
    for _ in range(1 if method.startswith("official") else 3):  # warm-up: Triton compile, allocator, caches
        run_step(method, batch)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run_step(method, batch)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(method, batch, device):
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_step(method, batch)
        synchronize(device)
        return torch.cuda.max_memory_allocated() - base
    probe = AllocationProbe()
    with probe:
        grad = run_step(method, batch)
    del grad
    return probe.peak


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or "cpu"
    return f"{model} ({torch.get_num_threads()} threads)"


def bytes_per_token_estimate():
    """Bytes the fused GPU kernels move per token, fp32 inputs, (B,) advantages (counted in benchmarks/gpu_report.py):
    the weights-only call's items, the loss forward's total (the unscaled gradient written too) and the backward's."""
    return bytes_per_token(4), single_pass_bytes(4, with_grad=True), sum(backward_bytes_per_token(4).values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 20480, 32768])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--official-repeats", type=int, default=3)
    parser.add_argument("--max-official-length", type=int, default=20480,
                        help="skip (a) and (b) above this T (O(T^2) time, T x 128 buffers)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the table and plot are written")
    args = parser.parse_args()
    device = torch.device(args.device)
    methods = ["official", "official_detached", "fipo_torch"]
    if device.type == "cpu" and c_kernel_usable():
        methods.append("fipo_c")
    if triton_usable(device) and device.type == "cuda":
        methods.append("fipo_triton")
    methods.append("dapo")
    labels = {"official": "(a) official, grad log-ratio", "official_detached": "(b) official, detached",
              "fipo_torch": "(c) fipo_loss torch path", "fipo_c": "(c') fipo_loss C kernel",
              "fipo_triton": "(d) fipo_loss triton", "dapo": "(e) TRL DAPO"}

    results = {}  # (method, T) -> (seconds, bytes)
    for T in args.lengths:
        batch = make_batch(args.batch, T, device)
        for method in methods:
            if method.startswith("official") and T > args.max_official_length:
                continue
            repeats = args.official_repeats if method.startswith("official") else args.repeats
            seconds = time_method(method, batch, device, repeats)
            results[method, T] = (seconds, peak_memory(method, batch, device))
            print(f"T={T:6d} {labels[method]:30s} {seconds * 1e3:10.2f} ms {results[method, T][1] / 2**20:10.1f} MiB",
                  flush=True)

    name = device_name(device)
    lines = [f"# FIPO loss forward+backward, B = {args.batch}, fp32", "",
             f"Device: **{name}**, torch {torch.__version__}. Median of {args.repeats} runs "
             f"({args.official_repeats} for (a)/(b)); peak extra memory of one step "
             f"({'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'storage probe'}). "
             "Ratios are against (e) at the same T.", "",
             "| T | method | time (ms) | ns / token | peak extra (MiB) | time / DAPO | memory / DAPO |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for T in args.lengths:
        floor_time, floor_mem = results["dapo", T]
        for method in methods:
            if (method, T) not in results:
                lines.append(f"| {T} | {labels[method]} | skipped (> --max-official-length) | | | | |")
                continue
            seconds, nbytes = results[method, T]
            lines.append(f"| {T} | {labels[method]} | {seconds * 1e3:.2f} | {seconds * 1e9 / (args.batch * T):.1f} | "
                         f"{nbytes / 2**20:.1f} | {seconds / floor_time:.2f}x | {nbytes / max(floor_mem, 1):.2f}x |")
    lines += ["", "Time per token across T (linear cost means flat): spread = (max - min) / (max + min), i.e. +- "
              "around the midpoint.", "", "| method | ns / token, min | ns / token, max | spread |",
              "|---|---:|---:|---:|"]
    for method in methods:
        per_token = [results[method, T][0] * 1e9 / (args.batch * T) for T in args.lengths if (method, T) in results]
        if len(per_token) > 1:
            low, high = min(per_token), max(per_token)
            lines.append(f"| {labels[method]} | {low:.1f} | {high:.1f} | +-{100 * (high - low) / (high + low):.0f}% |")
    weight_kernel, loss_forward, backward = bytes_per_token_estimate()
    lines += ["", "GPU bytes moved per token by the fused kernels (estimate, fp32 inputs, (B,) advantages; bf16 "
              "log-probs save 4 B): weight kernel "
              f"{sum(weight_kernel.values())} B ({', '.join(f'{k} {v}' for k, v in weight_kernel.items())}); "
              f"loss forward {loss_forward} B; backward {backward} B. "
              f"At B*T = 1M tokens the weight kernel moves ~{sum(weight_kernel.values())} MB: "
              f"~{sum(weight_kernel.values()) / 4.8:.1f} us at 4.8 TB/s (H200 HBM), "
              f"~{sum(weight_kernel.values()) / 3.35:.1f} us at 3.35 TB/s (H100 SXM)."]
    table = "\n".join(lines)
    print("\n" + table)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()[:60]
    (args.results_dir / f"fipo_loss_{slug}.md").write_text(table + "\n")
    if not args.no_plot:
        plot(results, methods, labels, args, name, args.results_dir / f"fipo_loss_{slug}.png")


def plot(results, methods, labels, args, name, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install -e '.[demo]'): no plot written")
        return
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in methods:
        lengths = [T for T in args.lengths if (method, T) in results]
        ax_time.plot(lengths, [results[method, T][0] * 1e3 for T in lengths], marker="o", label=labels[method])
        peak_mib = [max(results[method, T][1], 1) / 2**20 for T in lengths]
        ax_mem.plot(lengths, peak_mib, marker="o", label=labels[method])
    for ax, ylabel in ((ax_time, "forward+backward (ms)"), (ax_mem, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens per row)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.suptitle(f"FIPO loss, B = {args.batch}, fp32 — {name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
