"""Collect a real-model run into examples/results/real_model/: the table, the curves, the model card, the figures.

    python examples/real_model/summarize.py --train_log outputs/real-model-fipo-train.log \
        --run_dir outputs/real-model-fipo --eval_before outputs/real-model-eval/base \
        --eval_after outputs/real-model-eval/fipo --output_dir examples/results/real_model

Reads the training log (the console output of ``fipo-trl train``: its per-step metric dicts, including TRL's
``step_time``) and the two ``eval_results.json``, writes ``results.md`` and ``results.json``, and copies the run's
``training_curves.png``, its model card (``README.md`` -> ``model_card.md``) and the two ``eval_results.json``
(``eval_before.json``, ``eval_after.json``: every sample). Never the weights.

Time split (TRL's ``step_time`` times ``training_step``): with 8 updates per generation batch, the first step of each
batch also generates and scores the completions and recomputes the old log-probabilities; the other 7 only run the
forward and backward pass. So per generation batch, the first step's own update is taken as the median of the 7
update-only steps, and generation = first step time - that median (generation + updates = the sum of the step
times). ``optimizer.step()`` (AdamW), clipping and logging run outside
``training_step``: they are the Trainer's runtime minus the sum of the step times.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import statistics
from pathlib import Path

from fipo_trl.rewards import extract_answer


def log_entries(path: Path) -> tuple[list[dict], dict]:
    """(per-step metric dicts in order, the final train summary dict) from a ``fipo-trl train`` console log."""
    steps, summary = [], {}
    for match in re.finditer(r"\{'[^{}]*\}", path.read_text(errors="replace")):
        try:
            entry = ast.literal_eval(match.group(0))
        except (ValueError, SyntaxError):
            continue
        entry = {k: float(v) if isinstance(v, str) and re.fullmatch(r"[-+0-9.eE]+|nan|inf", v) else v
                 for k, v in entry.items()}
        if "train_runtime" in entry:
            summary = entry
        elif "step_time" in entry:
            steps.append(entry)
    return steps, summary


def time_split(steps: list[dict], updates_per_generation: int) -> dict:
    generation, update, batches = [], [], []
    for start in range(0, len(steps), updates_per_generation):
        batch = [s["step_time"] for s in steps[start:start + updates_per_generation]]
        if len(batch) < 2:
            continue
        per_update = statistics.median(batch[1:])
        generation.append(batch[0] - per_update)
        update.append(sum(batch[1:]) + per_update)
        batches.append({"first_step_s": round(batch[0], 1), "update_step_median_s": round(per_update, 2)})
    total_gen, total_update = sum(generation), sum(update)
    return {"generation_batches": len(batches), "generation_s": round(total_gen, 1),
            "update_s": round(total_update, 1),
            "generation_per_batch_s": round(statistics.median(generation), 1) if generation else None,
            "update_step_s": round(statistics.median(s["update_step_median_s"] for s in batches), 2) if batches
            else None, "per_batch": batches}


def eval_summary(folder: Path) -> dict:
    results = json.loads((folder / "eval_results.json").read_text())
    samples = [c for s in results["samples"] for c in s["completions"]]
    correct = sum(s["num_correct"] for s in results["samples"])
    parsed = sum(extract_answer(c) is not None for c in samples)
    return {"model": results["model"], "num_problems": results["num_problems"], "num_samples": results["num_samples"],
            "metrics": results["metrics"], "answer_parsed": round(parsed / len(samples), 4),
            "correct_given_parsed": round(correct / parsed, 4) if parsed else None,
            "generation": results["generation"], "seed": results["args"]["seed"], "k": results["args"]["k"]}


def paired_difference(before: Path, after: Path, resamples: int = 10000, seed: int = 0) -> dict:
    """Per-problem accuracy after - before (same problems, same order): the mean and a 95 % bootstrap interval over
    problems, and how many problems got better / worse."""
    import random

    b = json.loads((before / "eval_results.json").read_text())["samples"]
    a = json.loads((after / "eval_results.json").read_text())["samples"]
    assert [s["problem"] for s in b] == [s["problem"] for s in a], "the two evaluations are on different problems"
    diffs = [(y["num_correct"] - x["num_correct"]) / len(x["completions"]) for x, y in zip(b, a)]
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(resamples))
    return {"mean": round(sum(diffs) / len(diffs), 4),
            "ci95": [round(means[int(0.025 * resamples)], 4), round(means[int(0.975 * resamples)], 4)],
            "problems_better": sum(d > 0 for d in diffs), "problems_worse": sum(d < 0 for d in diffs),
            "problems_same": sum(d == 0 for d in diffs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_log", type=Path, required=True)
    parser.add_argument("--run_dir", type=Path, required=True)
    parser.add_argument("--eval_before", type=Path, required=True)
    parser.add_argument("--eval_after", type=Path, required=True)
    parser.add_argument("--output_dir", type=Path, default=Path("examples/results/real_model"))
    parser.add_argument("--updates_per_generation", type=int, default=8)
    parser.add_argument("--note", default="", help="Free text for the table's footer (e.g. the machine's load).")
    args = parser.parse_args()

    steps, summary = log_entries(args.train_log)
    split = time_split(steps, args.updates_per_generation)
    runtime = summary.get("train_runtime")
    # The Trainer's optimizer.step() (AdamW over all parameters), gradient clipping and logging run outside
    # training_step, so outside TRL's step_time.
    split["outside_step_time_s"] = round(runtime - sum(s["step_time"] for s in steps), 1) if runtime else None
    before, after = eval_summary(args.eval_before), eval_summary(args.eval_after)
    rewards = [s["reward"] for s in steps[::args.updates_per_generation] if "reward" in s]
    active = [s.get("fipo/active") for s in steps]
    result = {"optimizer_steps": len(steps), "train_runtime_s": summary.get("train_runtime"), "time": split,
              "reward_per_generation_batch": rewards, "fipo_active_per_step": active,
              "entropy_first_last": [steps[0].get("entropy"), steps[-1].get("entropy")] if steps else None,
              "eval_before": before, "eval_after": after,
              "paired_difference": paired_difference(args.eval_before, args.eval_after), "note": args.note}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    shutil.copyfile(args.run_dir / "training_curves.png", args.output_dir / "training_curves.png")
    shutil.copyfile(args.run_dir / "README.md", args.output_dir / "model_card.md")
    for name, folder in (("before", args.eval_before), ("after", args.eval_after)):  # every sample, ~200 KB each
        shutil.copyfile(folder / "eval_results.json", args.output_dir / f"eval_{name}.json")

    k = before["k"]
    names = [f"avg@{k}", "pass@1", f"pass@{k}", f"cons@{k}"]

    def row(label, e):
        values = " | ".join(f"{100 * e['metrics'][n]:.1f} %" for n in names if n in e["metrics"])
        return (f"| {label} | {values} | {100 * e['answer_parsed']:.1f} % | "
                f"{100 * (e['correct_given_parsed'] or 0):.1f} % |")

    present = [n for n in names if n in before["metrics"]]
    gen = after["generation"]
    lines = [
        f"# SmolLM2-135M-Instruct + FIPO on arithmetic up to 20 (held-out: {before['num_problems']} problems x {k} "
        "samples)", "",
        "| model | " + " | ".join(present) + " | answer line written | correct when written |",
        "|---|" + "---|" * (len(present) + 2),
        row("base (before)", before), row(f"FIPO, {len(steps)} steps (after)", after), "",
        f"Sampling: {gen['backend']}, temperature {gen['temperature']}, top_p {gen['top_p']}, "
        f"{gen['max_new_tokens']} new tokens, seed {before['seed']}, the same for both rows. Per-problem accuracy "
        f"change: {100 * result['paired_difference']['mean']:+.1f} points (95 % bootstrap interval over problems "
        f"{100 * result['paired_difference']['ci95'][0]:+.1f} to {100 * result['paired_difference']['ci95'][1]:+.1f}; "
        f"{result['paired_difference']['problems_better']} problems better, "
        f"{result['paired_difference']['problems_worse']} worse, {result['paired_difference']['problems_same']} "
        "unchanged).", "",
        "| training | value |", "|---|---|",
        f"| optimizer steps | {len(steps)} ({split['generation_batches']} generation batches x "
        f"{args.updates_per_generation} updates) |",
        f"| train runtime (Trainer) | {summary.get('train_runtime', float('nan')):.0f} s |",
        f"| generation + scoring + old log-probs | {split['generation_s']:.0f} s "
        f"({split['generation_per_batch_s']} s per batch of 64 completions) |",
        f"| updates (forward + backward) | {split['update_s']:.0f} s ({split['update_step_s']} s per optimizer step "
        "of 8 completions) |",
        f"| optimizer steps (AdamW), clipping, logging: the rest | {split['outside_step_time_s']:.0f} s "
        f"({split['outside_step_time_s'] / max(len(steps), 1):.1f} s per step) |",
        f"| reward per generation batch | {', '.join(f'{r:+.2f}' for r in rewards)} |",
    ]
    if args.note:
        lines += ["", args.note]
    (args.output_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
