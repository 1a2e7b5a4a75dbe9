"""What the trainer tests share: one explicit config for GRPOTrainer and FIPOTrainer, and a crafted micro-batch that
makes the sequence filter fire."""

import sys
from pathlib import Path

import torch
from trl import GRPOTrainer


def config_kwargs(tmp_path, **overrides):
    """One explicit config for both trainers: every field whose default FIPOConfig changes is set here, and two
    optimizer updates per generation batch so that the log-ratio is non-zero on every second micro-step."""
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        max_steps=4, learning_rate=1e-2, report_to="none", logging_steps=1, save_strategy="no", bf16=False,
        gradient_checkpointing=False, seed=0, steps_per_generation=2, loss_type="bnpo", delta=10.0, epsilon=0.2,
        epsilon_high=0.28, beta=0.0, vllm_importance_sampling_correction=False, disable_tqdm=True,
    )
    kwargs.update(overrides)
    return kwargs


def crafted_micro_batch(trainer, tokenizer):
    """A micro-batch whose old log-probs make response 0 (A < 0) have two tokens with ratio e^3 > delta = 10
    (dropped by the sequence filter) and response 1 (A < 0) one such token (kept), plus ordinary noise."""
    torch.manual_seed(0)
    prompt = tokenizer(["what is two plus three ?"] * 4, return_tensors="pt")
    completion_ids = torch.randint(7, 60, (4, 6))
    completion_mask = torch.tensor([[1] * 6, [1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    batch = {"prompt_ids": prompt["input_ids"], "prompt_mask": prompt["attention_mask"],
             "completion_ids": completion_ids, "completion_mask": completion_mask,
             "advantages": torch.tensor([-1.0, -0.5, 0.8, 0.7]), "num_items_in_batch": completion_mask.sum()}
    with torch.no_grad():
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([batch["prompt_ids"], completion_ids], 1),
            torch.cat([batch["prompt_mask"], completion_mask], 1), completion_ids.size(1))
    shift = torch.randn(4, 6) * 0.05
    shift[0, 1] = shift[0, 3] = 3.0
    shift[1, 2] = 3.0
    batch["old_per_token_logps"] = (logps - shift) * completion_mask
    return batch, logps


def load_report_module():
    """benchmarks/gpu_report.py as a module (benchmarks/ is not a package)."""
    benchmarks = str(Path(__file__).resolve().parents[2] / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        import gpu_report
    finally:
        sys.path.remove(benchmarks)
    return gpu_report
