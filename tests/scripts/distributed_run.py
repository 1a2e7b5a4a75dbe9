"""Launched by tests/trainer/test_distributed.py under `accelerate launch`: trains the tiny model with FIPO and writes
what each rank saw to <result_dir>/rank<i>.json."""

import sys

import torch
from rank_results import write_rank_result
from transformers import TrainerCallback

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.tools.tiny import digit_reward, tiny_prompt_dataset


class RecordLocalFutureKL(TrainerCallback):
    """Per optimizer step: did this rank's own micro-batch have a non-zero Future-KL?"""

    def __init__(self):
        self.trainer, self.active = None, []

    def on_step_end(self, args, state, control, **kwargs):
        batch = self.trainer.fipo_last_batch
        self.active.append(bool((batch["future_kl"][batch["mask"]] != 0).any()))


def main(model_path, output_dir, result_dir):
    args = FIPOConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, per_device_train_batch_size=2, num_generations=4,
        max_completion_length=8, max_steps=4, learning_rate=1e-2, fipo_updates_per_generation=2, report_to="none",
        logging_steps=1, save_strategy="no", gradient_checkpointing=False, seed=0, disable_tqdm=True,
        ddp_find_unused_parameters=False,
    )
    recorder = RecordLocalFutureKL()
    trainer = FIPOTrainer(model=model_path, reward_funcs=digit_reward, args=args,
                          train_dataset=tiny_prompt_dataset(32), callbacks=[recorder])
    recorder.trainer = trainer
    trainer.train()
    acc = trainer.accelerator
    params = torch.cat([p.detach().double().flatten() for p in trainer.model.parameters()])
    result = {
        "rank": acc.process_index, "num_processes": acc.num_processes, "distributed_type": str(acc.distributed_type),
        "local_future_kl_active": recorder.active, "param_sum": params.sum().item(),
        "param_abs_sum": params.abs().sum().item(), "param_head": params[:64].tolist(),
        "logged_active": [h["fipo/active"] for h in trainer.state.log_history if "fipo/active" in h],
    }
    write_rank_result(result_dir, acc, result)


if __name__ == "__main__":
    main(*sys.argv[1:4])
