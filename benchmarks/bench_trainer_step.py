"""Wall time of a whole optimizer step: FIPOTrainer vs GRPOTrainer (DAPO loss) on the same tiny config.

    python benchmarks/bench_trainer_step.py [--steps 64] [--rounds 8]
        [--hidden_size 64 --num_layers 2 --completion_length 32]

Both trainers get the same model, data, seed and batch geometry (4 optimizer updates per generation batch, so
FIPO's weights are live), `loss_type="dapo"`, delta 10, epsilon_high 0.28, and completions of exactly the length cap
(`min_new_tokens`), so that each update step processes the same shapes in both. Steps that generate are timed
separately from update-only steps: generation dominates the former and is identical code in both trainers.
Rounds alternate the order of the two trainers; the headline ratio is the median over rounds of the ratio of the two
back-to-back runs, which cancels the drift of a shared machine. Writes benchmarks/results/trainer_step_<device>.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.tools.tiny import build_tiny_model, digit_reward, tiny_prompt_dataset

RESULTS = Path(__file__).parent / "results"


class StepTimer(TrainerCallback):
    def __init__(self):
        self.started, self.times = None, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.started)


def run(trainer_cls, config_cls, model_path, steps, output_dir, completion_length):
    args = config_cls(
        output_dir=output_dir, bf16=False, per_device_train_batch_size=8, num_generations=8,
        max_completion_length=completion_length,
        max_steps=steps, learning_rate=1e-3, steps_per_generation=4, loss_type="dapo", delta=10.0, epsilon_high=0.28,
        beta=0.0, vllm_importance_sampling_correction=False, report_to="none", logging_steps=1, save_strategy="no",
        gradient_checkpointing=False, seed=0, disable_tqdm=True,
        # Every completion runs to the length cap, so both trainers update on the same shapes: otherwise FIPO's
        # different learning changes how long the completions are, and the timing measures that, not the loss.
        generation_kwargs={"min_new_tokens": completion_length},
    )
    timer = StepTimer()
    trainer = trainer_cls(model=model_path, reward_funcs=digit_reward, args=args,
                          train_dataset=tiny_prompt_dataset(64), callbacks=[timer])
    trainer.train()
    generating = [t for i, t in enumerate(timer.times) if i % 4 == 0]
    updating = [t for i, t in enumerate(timer.times) if i % 4 != 0]
    return generating[1:], updating[3:]  # drop warm-up steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--completion_length", type=int, default=32)
    cli = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tmp = tempfile.mkdtemp()
    model_path = str(build_tiny_model(f"{tmp}/model", hidden_size=cli.hidden_size, num_layers=cli.num_layers))
    times = {"GRPOTrainer (dapo)": ([], []), "FIPOTrainer": ([], [])}
    round_ratios = []  # FIPO / GRPO median update step of back-to-back runs: drift on a shared machine cancels
    pairs = [("GRPOTrainer (dapo)", GRPOTrainer, GRPOConfig), ("FIPOTrainer", FIPOTrainer, FIPOConfig)]
    for round_ in range(cli.rounds):
        round_medians = {}
        for name, trainer_cls, config_cls in pairs if round_ % 2 == 0 else pairs[::-1]:
            generating, updating = run(trainer_cls, config_cls, model_path, cli.steps, f"{tmp}/{name}-{round_}",
                                       cli.completion_length)
            times[name][0].extend(generating)
            times[name][1].extend(updating)
            round_medians[name] = statistics.median(updating)
        round_ratios.append(round_medians["FIPOTrainer"] / round_medians["GRPOTrainer (dapo)"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    config = f"hidden {cli.hidden_size}, {cli.num_layers} layers, completions <= {cli.completion_length} tokens"
    lines = [f"## {config} ({device})", "",
             f"{cli.rounds} rounds x {cli.steps} steps, 8 completions per step, 4 updates per generation batch; "
             "median step time in ms over all rounds.", "",
             "| trainer | update-only step | generating step | all steps (mean) |", "|---|---:|---:|---:|"]
    medians = {}
    for name, (generating, updating) in times.items():
        medians[name] = statistics.median(updating)
        mean_all = statistics.mean(generating * 1 + updating) * 1e3
        lines.append(f"| {name} | {medians[name] * 1e3:.2f} | {statistics.median(generating) * 1e3:.2f} | "
                     f"{mean_all:.2f} |")
    ratio = medians["FIPOTrainer"] / medians["GRPOTrainer (dapo)"]
    lines += ["", f"FIPOTrainer / GRPOTrainer update-only step: **{statistics.median(round_ratios):.3f}x** (median of "
              f"the {cli.rounds} back-to-back rounds; per round {', '.join(f'{r:.3f}' for r in round_ratios)}; "
              f"pooled medians {ratio:.3f}x)"]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    geometry = f"h{cli.hidden_size}_l{cli.num_layers}_t{cli.completion_length}"
    name = f"trainer_step_{device.replace(' ', '_').lower()}_{geometry}"
    (RESULTS / f"{name}.md").write_text(text)


if __name__ == "__main__":
    main()
