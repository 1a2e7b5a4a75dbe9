"""FIPO vs DAPO on the demo's arithmetic task: same warm-started models, seeds, data, reward and budget.

    python examples/compare_fipo_dapo.py --output_dir examples/results     # 5 seeds x 2 methods, ~15 min on 2 cores
    python examples/compare_fipo_dapo.py --quick --output_dir /tmp/cmp     # seconds: a smoke run of the pipeline

FIPO is FIPOTrainer(FIPOConfig); DAPO is TRL's GRPOTrainer(GRPOConfig) with the same loss settings (loss_type bnpo,
dual clip delta=10, clip-higher epsilon_high=0.28, beta=0) and the SAME steps_per_generation, i.e. several optimizer
updates per generation batch: the only difference is FIPO's Future-KL weight on the advantages. For each seed both
methods start from the same warm-started tiny model (examples/arithmetic_demo.py).

Writes fipo_vs_dapo.png (reward, completion length and FIPO weight statistics vs step, mean +- std over seeds),
fipo_vs_dapo.md (final reward and greedy accuracy, mean +- std over seeds, and FIPO - DAPO per seed with the paired
t-test, the Wilcoxon signed-rank test and a paired bootstrap CI) and fipo_vs_dapo.json (every number); --report_only
rewrites the table from that JSON.
Needs matplotlib and scipy: pip install 'fipo_trl[demo]'.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ("fipo", "dapo")
LABELS = {"fipo": "FIPO", "dapo": "DAPO"}
KEPT_FIPO_METRICS = ("fipo/influence_weights_mean", "fipo/influence_weights_max", "fipo/IW_upper_clip_ratio",
                     "fipo/future_kl_mean", "fipo/active", "fipo/dropped_seq_ratio")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/compare-fipo-dapo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--max_steps", type=int, default=2400)
    parser.add_argument("--logging_steps", type=int, default=32, help="a multiple of 8: whole generation batches")
    parser.add_argument("--warm_start_steps", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2,
                        help="runs in parallel, one torch thread each (1 runs everything in this process)")
    parser.add_argument("--report_only", metavar="JSON",
                        help="rewrite fipo_vs_dapo.md from an earlier run's fipo_vs_dapo.json, without training")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 seeds, 16 steps, 20 warm-start steps, in this process")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.max_steps, args.logging_steps, args.warm_start_steps, args.workers = [0, 1], 16, 8, 20, 1
    return args


def train_one(method: str, seed: int, model_path: str, max_steps: int, logging_steps: int) -> dict:
    """One training run; returns its log history, greedy accuracy and wall time (picklable, for worker processes)."""
    import torch

    torch.set_num_threads(1)  # tiny model: threads only add contention between parallel runs
    from arithmetic_demo import build_trainer, greedy_accuracy, training_args

    with tempfile.TemporaryDirectory() as output_dir:
        config = training_args(method, output_dir, seed=seed, max_steps=max_steps, logging_steps=logging_steps,
                               disable_tqdm=True)
        trainer = build_trainer(method, model_path, config)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        accuracy = greedy_accuracy(trainer.model, trainer.processing_class)
    print(f"{LABELS[method]} seed {seed}: {seconds:.0f} s, greedy accuracy {accuracy:.1%}", flush=True)
    keep = {"step", "reward", "completions/mean_length", *KEPT_FIPO_METRICS}  # enough for the plot, small JSON
    history = [{k: v for k, v in entry.items() if k in keep} for entry in trainer.state.log_history]
    return {"method": method, "seed": seed, "log_history": history, "greedy_accuracy": accuracy,
            "train_seconds": seconds}


def summary_table(runs: list[dict], args, start_accuracy: dict[int, float]) -> str:
    from arithmetic_demo import final_reward
    from seed_statistics import PAIRED_HEADER, mean_std, paired_significance_row

    lines = [
        f"FIPO vs DAPO, tiny Llama on single-digit arithmetic, {args.max_steps} optimizer steps "
        f"(8 updates per generation batch), seeds {', '.join(map(str, args.seeds))}; mean ± std over seeds.",
        "",
        "| method | final reward (last 10 % of steps) | greedy accuracy after | train time per run (s) |",
        "|---|---|---|---|",
    ]
    for method in METHODS:
        mine = [run for run in runs if run["method"] == method]
        rewards = [final_reward(run["log_history"]) for run in mine]
        accuracies = [run["greedy_accuracy"] for run in mine]
        seconds = [run["train_seconds"] for run in mine]
        lines.append(f"| {LABELS[method]} | {mean_std(rewards)} | {mean_std(accuracies, percent=True)} | "
                     f"{statistics.mean(seconds):.0f} |")
    before = list(start_accuracy.values())
    lines += ["", f"Greedy accuracy of the warm-started models before RL: {mean_std(before, percent=True)}. "
              "Reward is +1 for a correct \"the answer is D .\", -1 otherwise, sampled at temperature 1 "
              "(0 = half right).", "", "FIPO - DAPO, per seed (both start from the seed's warm start: paired tests "
              "over seeds):", "", PAIRED_HEADER]

    def by_seed(method, read):  # both methods start from the same warm start per seed: a paired design
        return {run["seed"]: read(run) for run in runs if run["method"] == method}

    lines.append(paired_significance_row("final reward", *(by_seed(m, lambda r: final_reward(r["log_history"]))
                                                           for m in METHODS)))
    lines.append(paired_significance_row("greedy accuracy after", *(by_seed(m, lambda r: r["greedy_accuracy"])
                                                                    for m in METHODS), percent=True))
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.report_only:
        with open(args.report_only) as f:
            data = json.load(f)
        args.seeds, args.max_steps = data["args"]["seeds"], data["args"]["max_steps"]
        starts = {int(seed): value for seed, value in data["start_greedy_accuracy"].items()}
        table = summary_table(data["runs"], args, starts)
        table += (f"\nTotal wall time {data['wall_seconds'] / 60:.1f} min ({data['args']['workers']} runs in "
                  "parallel).\n")
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "fipo_vs_dapo.md"), "w") as f:
            f.write(table)
        print(table)
        return
    import torch

    torch.set_num_threads(1)
    from arithmetic_demo import greedy_accuracy, prepare_model
    from seed_statistics import run_jobs

    from fipo_trl.tools.plots import plot_training_curves

    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        # One warm-started model per seed, shared by both methods.
        models, start_accuracy = {}, {}
        for seed in args.seeds:
            models[seed] = str(prepare_model(os.path.join(workdir, f"seed-{seed}"), seed=seed,
                                             warm_start_steps=args.warm_start_steps))
            from transformers import AutoModelForCausalLM, AutoTokenizer

            start_accuracy[seed] = greedy_accuracy(AutoModelForCausalLM.from_pretrained(models[seed]),
                                                   AutoTokenizer.from_pretrained(models[seed]))
        jobs = [(method, seed, models[seed], args.max_steps, args.logging_steps)
                for seed in args.seeds for method in METHODS]
        runs = run_jobs(train_one, jobs, args.workers)
    wall = time.perf_counter() - start

    png = os.path.join(args.output_dir, "fipo_vs_dapo.png")
    plot_training_curves({LABELS[m]: [r["log_history"] for r in runs if r["method"] == m] for m in METHODS}, png,
                         title=f"FIPO vs DAPO: tiny Llama, single-digit arithmetic, mean ± std over "
                               f"{len(args.seeds)} seeds", smooth=1)
    table = summary_table(runs, args, start_accuracy)
    table += f"\nTotal wall time {wall / 60:.1f} min ({args.workers} runs in parallel).\n"
    with open(os.path.join(args.output_dir, "fipo_vs_dapo.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.output_dir, "fipo_vs_dapo.json"), "w") as f:
        json.dump({"args": vars(args), "wall_seconds": wall, "start_greedy_accuracy": start_accuracy,
                   "runs": runs}, f)
    print("\n" + table)
    print(f"Written: {png}, fipo_vs_dapo.md, fipo_vs_dapo.json in {args.output_dir}")


if __name__ == "__main__":
    main()
