"""Launched by tests/trainer/test_resume.py: trains the tiny model with FIPO, optionally SIGKILLs itself right after
the checkpoint of a given step, or resumes from a checkpoint; writes the final parameters to <output_dir>/final.pt."""

import argparse
import os
import signal

import torch
from transformers import TrainerCallback

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.tools.tiny import digit_reward, tiny_prompt_dataset


class KillAfterCheckpoint(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as if the machine was pre-empted


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_path")
    parser.add_argument("output_dir")
    parser.add_argument("--kill_after_step", type=int)
    parser.add_argument("--resume_from_checkpoint")
    parser.add_argument("--save_steps", type=int, default=2)
    cli = parser.parse_args()
    args = FIPOConfig(
        output_dir=cli.output_dir, bf16=False, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, max_steps=6, learning_rate=1e-2, fipo_updates_per_generation=2,
        report_to="none", logging_steps=1, save_strategy="steps", save_steps=cli.save_steps,
        gradient_checkpointing=False, seed=0, disable_tqdm=True,
    )
    callbacks = [KillAfterCheckpoint(cli.kill_after_step)] if cli.kill_after_step else []
    trainer = FIPOTrainer(model=cli.model_path, reward_funcs=digit_reward, args=args,
                          train_dataset=tiny_prompt_dataset(32), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=cli.resume_from_checkpoint)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    active = [h["fipo/active"] for h in trainer.state.log_history if "fipo/active" in h]
    torch.save({"params": {n: p.detach() for n, p in trainer.model.named_parameters()}, "losses": losses,
                "active": active},
               os.path.join(cli.output_dir, "final.pt"))


if __name__ == "__main__":
    main()
