"""An offline task on which the tiny model visibly learns with FIPO (or DAPO) in minutes on a CPU.

The task is single-digit arithmetic in the tiny vocabulary: "what is seven minus three ?" -> "the answer is 4 ."
(110 problems). A short supervised warm start, stopped early, teaches the answer format and some arithmetic (about
40-55 % greedy accuracy); reinforcement learning from a DAPO-style +1 / -1 correctness reward does the rest.

Used by ``examples/demo_learning.py`` (one FIPO run with curves, influence page and model card) and
``examples/compare_fipo_dapo.py`` (FIPO against GRPOTrainer configured as DAPO, several seeds).
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import torch

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ANSWER_PREFIX = "the answer is"
OPERATIONS = ("plus", "minus")
_ANSWER = re.compile(r"^the answer is (\d) \.$")


def arithmetic_problems(operations: tuple[str, ...] = OPERATIONS, max_operand: int = 9) -> list[tuple[str, str]]:
    """Every (prompt, answer) whose answer is one digit: a + b <= 9 and a - b >= 0 over 0..max_operand."""
    problems = []
    for op in operations:
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                result = a + b if op == "plus" else a - b
                if 0 <= result <= 9:
                    problems.append((f"what is {DIGIT_WORDS[a]} {op} {DIGIT_WORDS[b]} ?", str(result)))
    return problems


def arithmetic_dataset(n: int, *, seed: int = 0, operations: tuple[str, ...] = OPERATIONS, max_operand: int = 9):
    """``n`` prompts drawn uniformly (with replacement) from ``arithmetic_problems``, with an ``answer`` column."""
    from datasets import Dataset

    problems = arithmetic_problems(operations, max_operand)
    rng = random.Random(seed)
    rows = [rng.choice(problems) for _ in range(n)]
    return Dataset.from_dict({"prompt": [p for p, _ in rows], "answer": [a for _, a in rows]})


def parse_answer(completion) -> str | None:
    """The digit D of a completion that is exactly "the answer is D .", else None (broken format, trailing text,
    or a completion cut at max_completion_length)."""
    text = completion if isinstance(completion, str) else completion[-1]["content"]
    match = _ANSWER.match(text.strip())
    return match.group(1) if match else None


def correctness_reward(completions, answer, **kwargs) -> list[float]:
    """DAPO-style verifier reward: +1 for exactly "the answer is D ." with the right digit D, -1 otherwise."""
    return [1.0 if parse_answer(c) == a else -1.0 for c, a in zip(completions, answer)]


def warm_start(base_model: str | Path, output_dir: str | Path, *, steps: int = 400, batch_size: int = 32,
               learning_rate: float = 3e-3, seed: int = 0, operations: tuple[str, ...] = OPERATIONS,
               max_operand: int = 9) -> Path:
    """A few plain supervised steps on "the answer is D ." targets; save the model and tokenizer to ``output_dir``.

    Stopped early on purpose: after 400 steps the tiny model has the format but answers only ~40-55 % of the problems
    correctly (greedy), leaving the rest to reinforcement learning. Weaker starts are fragile: from ~20 % (200
    steps) some seeds collapse onto one answer for every prompt, and a warm start on random digits teaches the model
    to ignore the prompt altogether, from which RL on this model does not recover within minutes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fipo_trl.tools.tiny import supervised_step

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    model.train()
    problems = arithmetic_problems(operations, max_operand)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    for _ in range(steps):
        pairs = [rng.choice(problems) for _ in range(batch_size)]
        supervised_step(model, tokenizer, optimizer, [(p, f"{ANSWER_PREFIX} {a} .") for p, a in pairs])
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


@torch.no_grad()
def greedy_accuracy(model, tokenizer, *, operations: tuple[str, ...] = OPERATIONS, max_operand: int = 9) -> float:
    """Fraction of all problems answered correctly with greedy decoding (a noise-free view of what was learned)."""
    problems = arithmetic_problems(operations, max_operand)
    was_training = model.training
    model.eval()
    batch = tokenizer([p for p, _ in problems], return_tensors="pt", padding=True).to(model.device)
    output = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return sum(parse_answer(t) == a for t, (_, a) in zip(texts, problems)) / len(problems)


def prepare_model(workdir: str | Path, *, seed: int = 0, warm_start_steps: int = 400) -> Path:
    """Build the tiny offline model and warm-start it on the answer format; return the warm-started path."""
    from fipo_trl.tools.tiny import build_tiny_model

    workdir = Path(workdir)
    base = build_tiny_model(workdir / "base-model", seed=seed)
    return warm_start(base, workdir / "warm-start", steps=warm_start_steps, seed=seed)


# The demo's training setup, shared by FIPO and DAPO so that the comparison differs in the trainer only. Sizes and
# the learning rate are tuned for the tiny model on CPU; the loss settings are the official FIPO/DAPO ones.
DEMO_TRAINING = dict(
    per_device_train_batch_size=64,  # completions per optimizer update (8 prompts x 8 completions)
    num_generations=8,
    steps_per_generation=8,  # 8 optimizer updates per generation batch, as the official runs (docs/algorithm.md §2.1)
    max_completion_length=8,
    temperature=1.0,
    learning_rate=5e-4,  # 1e-3 and above drift away from the answer format on this model
    lr_scheduler_type="constant",
    loss_type="bnpo", epsilon=0.2, epsilon_high=0.28, delta=10.0, beta=0.0,  # official FIPO / DAPO loss settings
    vllm_importance_sampling_correction=False,
    bf16=False, gradient_checkpointing=False, save_strategy="no", report_to="none",
)


def training_args(method: str, output_dir: str | Path, *, seed: int, max_steps: int, logging_steps: int, **overrides):
    """FIPOConfig (method "fipo") or GRPOConfig configured as DAPO (method "dapo") with the demo's settings."""
    kwargs = {**DEMO_TRAINING, "output_dir": str(output_dir), "seed": seed, "max_steps": max_steps,
              "logging_steps": logging_steps, **overrides}
    if method == "fipo":
        from fipo_trl.config import FIPOConfig

        return FIPOConfig(**kwargs)
    if method == "dapo":
        from trl import GRPOConfig

        return GRPOConfig(**kwargs)
    raise ValueError(f"method must be 'fipo' or 'dapo', got {method!r}")


def build_trainer(method: str, model_path: str | Path, args, *, dataset_size: int = 4096, callbacks=None):
    """FIPOTrainer or GRPOTrainer (DAPO) on the arithmetic task with the correctness reward."""
    if method == "fipo":
        from fipo_trl.trainer import FIPOTrainer as trainer_cls
    else:
        from trl import GRPOTrainer as trainer_cls
    return trainer_cls(model=str(model_path), reward_funcs=correctness_reward, args=args,
                       train_dataset=arithmetic_dataset(dataset_size, seed=args.seed), callbacks=callbacks)


def quiet_progress_bar(trainer) -> None:
    """Keep the Trainer's progress bar but drop its printout of every log dict (~50 keys per step with FIPO);
    PrintFIPOMetricsCallback prints the compact line instead."""
    from transformers.trainer_callback import ProgressCallback

    class ProgressBarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressBarOnly())


def final_reward(log_history: list[dict], fraction: float = 0.1) -> float:
    """Mean sampled reward over the last ``fraction`` of the logged steps (at least one log entry)."""
    rewards = [entry["reward"] for entry in log_history if "reward" in entry]
    tail = rewards[-max(1, round(len(rewards) * fraction)):]
    return sum(tail) / len(tail)


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
