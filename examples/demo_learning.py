"""See FIPO learn, offline, on a CPU, in a few minutes.

    python examples/demo_learning.py                       # ~2-3 min on 2 CPU cores
    python examples/demo_learning.py --max_steps 16        # a smoke run

1. Builds the tiny Llama locally (no download) and warm-starts it for a few supervised steps on the answer format of
   single-digit arithmetic ("what is seven minus three ?" -> "the answer is 4 ."), stopped early: ~40-55 % correct.
2. Trains it with FIPOTrainer (8 optimizer updates per generation batch, official FIPO loss settings) on a +1 / -1
   correctness reward, printing the progress bar and one line of FIPO metrics per logging step.
3. Writes to --output_dir: the model and its FIPO model card (README.md), the learning curves (training_curves.png,
   linked from the card), the token-influence page (fipo_influence/latest.html: each completion token shaded by its
   FIPO weight) and demo_results.json (greedy accuracy before/after, final reward, wall times).

Needs matplotlib: pip install 'fipo_trl[demo]'.
"""

from __future__ import annotations

import argparse
import json
import os
import time

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")  # everything is built locally
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/fipo-demo")
    parser.add_argument("--max_steps", type=int, default=2400, help="optimizer steps of the RL stage")
    parser.add_argument("--logging_steps", type=int, default=32, help="a multiple of 8: whole generation batches")
    parser.add_argument("--influence_every", type=int, default=400,
                        help="write the token-influence page every N steps (a multiple of 8, so that the page shows "
                             "the last, most off-policy update of a generation batch)")
    parser.add_argument("--warm_start_steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 is fastest for this tiny model on a busy machine")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    from arithmetic_demo import (
        arithmetic_problems,
        build_trainer,
        final_reward,
        greedy_accuracy,
        prepare_model,
        quiet_progress_bar,
        timed,
        training_args,
    )

    from fipo_trl.tools.callbacks import PrintFIPOMetricsCallback
    from fipo_trl.tools.influence import TokenInfluenceCallback
    from fipo_trl.tools.plots import TrainingCurvesCallback

    start = time.perf_counter()
    model_path, warm_seconds = timed(prepare_model, os.path.join(args.output_dir, "warm-start-model"),
                                     seed=args.seed, warm_start_steps=args.warm_start_steps)
    config = training_args("fipo", args.output_dir, seed=args.seed, max_steps=args.max_steps,
                           logging_steps=args.logging_steps, disable_tqdm=False)
    trainer = build_trainer("fipo", model_path, config,
                            callbacks=[PrintFIPOMetricsCallback(), TrainingCurvesCallback(label="FIPO")])
    quiet_progress_bar(trainer)
    trainer.add_callback(TokenInfluenceCallback(trainer, every_n_steps=args.influence_every))

    accuracy_before = greedy_accuracy(trainer.model, trainer.processing_class)
    print(f"Warm start ({args.warm_start_steps} supervised steps, {warm_seconds:.0f} s): greedy accuracy "
          f"{accuracy_before:.1%} on all {len(arithmetic_problems())} problems. Training with FIPO...", flush=True)
    _, train_seconds = timed(trainer.train)
    accuracy_after = greedy_accuracy(trainer.model, trainer.processing_class)

    trainer.save_model(args.output_dir)
    trainer.create_model_card(model_name="fipo-tiny-arithmetic-demo")  # built-in data: no Hub dataset to link
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    results = {
        "greedy_accuracy_before": accuracy_before, "greedy_accuracy_after": accuracy_after,
        "reward_first_log": rewards[0] if rewards else None, "final_reward": final_reward(trainer.state.log_history),
        "max_steps": args.max_steps, "seed": args.seed, "warm_start_seconds": round(warm_seconds, 1),
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.perf_counter() - start, 1),
    }
    with open(os.path.join(args.output_dir, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nGreedy accuracy {accuracy_before:.1%} -> {accuracy_after:.1%}; sampled reward "
          f"{results['reward_first_log']:+.2f} (first log) -> {results['final_reward']:+.2f} (last 10 % of steps); "
          f"RL {train_seconds:.0f} s, total {results['total_seconds']:.0f} s.")
    print(f"Written to {args.output_dir}: README.md (model card), training_curves.png, "
          "fipo_influence/latest.html, demo_results.json")
    return trainer, results


if __name__ == "__main__":
    main()
