"""Launched by tests/trainer/test_sharded.py under `accelerate launch` with one of our accelerate configs (DDP, FSDP2,
DeepSpeed ZeRO-2/3) on 2 CPU processes: trains the tiny model with FIPO for 4 steps, saving checkpoint-2 and
checkpoint-4, saves the final model, and writes what each rank saw (losses, FIPO's activity, the full final
parameters) to <result_dir>/rank<i>.json.

    python sharded_run.py MODEL OUTPUT_DIR RESULT_DIR [--resume] [--lora_reference_dynamic]
                          [--kill_rank1_in_save STEP] [--kill_rank1_at_step STEP] [--push_to_hub REPO]
"""

import os
import signal

import cpu_sharding  # noqa: F401 - first: accelerate's CPU device and process detection (see its docstring)
import torch
from rank_results import run_parser, write_rank_result
from transformers import TrainerCallback

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.tools.tiny import digit_reward, tiny_prompt_dataset


class KillRank1AtStep(TrainerCallback):
    """SIGKILLs rank 1 at the end of an optimizer step: a rank that dies mid-run (out of memory, a node lost)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and args.process_index == 1:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_rank1_in_save(trainer, step):
    """SIGKILL rank 1 inside the save of checkpoint-<step>, once its model and optimizer shards are written and
    before the save has finished (its RNG state, trainer_state.json, the marker's removal)."""
    original = trainer._save_rng_state

    def save_rng_state(output_dir):
        if trainer.state.global_step == step and trainer.args.process_index == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        original(output_dir)

    trainer._save_rng_state = save_rng_state


def main():
    parser = run_parser()
    parser.add_argument("--resume", action="store_true", help="--resume_from_checkpoint true")
    parser.add_argument("--lora_reference_dynamic", action="store_true",
                        help="LoRA, beta > 0 (a reference model) and dynamic sampling, together")
    parser.add_argument("--kill_rank1_in_save", type=int)
    parser.add_argument("--kill_rank1_at_step", type=int)
    parser.add_argument("--push_to_hub", metavar="REPO", help="push the checkpoints and the final model (HF_ENDPOINT)")
    options = parser.parse_args()
    extra, peft_config = {}, None
    if options.push_to_hub:
        extra = dict(push_to_hub=True, hub_model_id=options.push_to_hub, hub_strategy="every_save")
    if options.lora_reference_dynamic:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        extra = dict(beta=0.04, dynamic_sampling=True, dynamic_sampling_max_retries=2, learning_rate=5e-2)
    args = FIPOConfig(**{**dict(
        output_dir=options.output_dir, bf16=False, per_device_train_batch_size=2, num_generations=4,
        max_completion_length=8, max_steps=4, learning_rate=1e-2, fipo_updates_per_generation=2, report_to="none",
        logging_steps=1, save_strategy="steps", save_steps=2, gradient_checkpointing=False, seed=0,
        disable_tqdm=True), **extra})
    callbacks = [KillRank1AtStep(options.kill_rank1_at_step)] if options.kill_rank1_at_step else []
    trainer = FIPOTrainer(model=options.model_path, reward_funcs=digit_reward, args=args,
                          train_dataset=tiny_prompt_dataset(32), peft_config=peft_config, callbacks=callbacks)
    if options.kill_rank1_in_save:
        kill_rank1_in_save(trainer, options.kill_rank1_in_save)
    trainer.train(resume_from_checkpoint=True if options.resume else None)
    trainer.save_model(f"{options.output_dir}/final")  # the whole model: gathered from the shards
    if options.push_to_hub:
        trainer.push_to_hub(dataset_name="fipo-user/tiny-arithmetic")
    acc = trainer.accelerator
    state = acc.get_state_dict(trainer.model_wrapped)  # the full weights, gathered (on the main process)
    result = {"rank": acc.process_index, "num_processes": acc.num_processes,
              "distributed_type": str(acc.distributed_type), "global_step": trainer.state.global_step,
              "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
              "active": [h["fipo/active"] for h in trainer.state.log_history if "fipo/active" in h],
              "kl": [h["kl"] for h in trainer.state.log_history if "kl" in h],
              "dynamic_sampling": [h["dynamic_sampling/kept_groups"] for h in trainer.state.log_history
                                   if "dynamic_sampling/kept_groups" in h]}
    if acc.is_main_process:
        flat = torch.cat([state[name].detach().double().flatten() for name in sorted(state)])
        result.update(param_names=sorted(state), params=flat.tolist())
    write_rank_result(options.result_dir, acc, result)


if __name__ == "__main__":
    main()
