"""Launched by tests/trainer/test_sharded.py under `accelerate launch` with one of our accelerate configs (DDP, FSDP2,
DeepSpeed ZeRO-2/3) on 2 CPU processes: trains the tiny model with FIPO for 4 steps, saving checkpoint-2 and
checkpoint-4, and writes what each rank saw (losses, FIPO's activity, the full final parameters' fingerprint) to
<result_dir>/rank<i>.json.

    python sharded_run.py MODEL OUTPUT_DIR RESULT_DIR
"""

import sys

import cpu_sharding  # noqa: F401 - first: accelerate's CPU device and process detection (see its docstring)
import torch
from rank_results import write_rank_result

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.tools.tiny import digit_reward, tiny_prompt_dataset


def main(model_path, output_dir, result_dir):
    args = FIPOConfig(
        output_dir=output_dir, bf16=False, per_device_train_batch_size=2, num_generations=4, max_completion_length=8,
        max_steps=4, learning_rate=1e-2, fipo_updates_per_generation=2, report_to="none", logging_steps=1,
        save_strategy="steps", save_steps=2, gradient_checkpointing=False, seed=0, disable_tqdm=True,
    )
    trainer = FIPOTrainer(model=model_path, reward_funcs=digit_reward, args=args,
                          train_dataset=tiny_prompt_dataset(32))
    trainer.train()
    acc = trainer.accelerator
    state = acc.get_state_dict(trainer.model_wrapped)  # the full weights, gathered (on the main process)
    result = {"rank": acc.process_index, "num_processes": acc.num_processes,
              "distributed_type": str(acc.distributed_type),
              "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
              "active": [h["fipo/active"] for h in trainer.state.log_history if "fipo/active" in h]}
    if acc.is_main_process:
        flat = torch.cat([state[name].detach().double().flatten() for name in sorted(state)])
        result.update(param_names=sorted(state), params=flat.tolist())
    write_rank_result(result_dir, acc, result)


if __name__ == "__main__":
    main(*sys.argv[1:4])
