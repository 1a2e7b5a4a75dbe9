"""Launched by tests/trainer/test_distributed.py under `accelerate launch`: FIPO with dynamic sampling on several
processes.

    dynamic_sampling_run.py MODEL OUTPUT_DIR RESULT_DIR [CHECKPOINT]

Trains 8 optimizer steps (a checkpoint every 4, on generation-batch boundaries), or resumes from CHECKPOINT, and
writes what each rank saw to RESULT_DIR/rank<i>.json: the batches the dynamic sampler handed to TRL (prompt, answer
and advantage of each local row), the log history and the final parameters.
"""

import sys

import torch
from rank_results import write_rank_result

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.tools.tiny import digit_reward, tiny_prompt_dataset

G = 4


def odd_answers_uniform(completions, answer, **kwargs):
    """1.0 for every completion of a prompt whose answer is odd (a uniform group, to be dropped); the toy reward,
    which varies with the completion, for the others."""
    varied = digit_reward(completions, answer=answer)
    return [1.0 if int(a) % 2 == 1 else r for a, r in zip(answer, varied)]


def main(model_path, output_dir, result_dir, checkpoint=None):
    # 3 rows per process x 2 processes x 2 micro-steps = 12 rows = 3 groups per generation batch: the middle group
    # straddles the two ranks.
    args = FIPOConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, per_device_train_batch_size=3, num_generations=G,
        max_completion_length=6, max_steps=8, learning_rate=1e-2, fipo_updates_per_generation=2, report_to="none",
        logging_steps=1, save_strategy="steps", save_steps=4, gradient_checkpointing=False, seed=0,
        disable_tqdm=True, ddp_find_unused_parameters=False, dynamic_sampling=True, dynamic_sampling_max_retries=3,
    )
    trainer = FIPOTrainer(model=model_path, reward_funcs=odd_answers_uniform, args=args,
                          train_dataset=tiny_prompt_dataset(32))
    batches, original = [], trainer._generate_and_score_completions
    answers = dict(zip(trainer.train_dataset["prompt"], trainer.train_dataset["answer"]))

    def recording(inputs):
        batch = original(inputs)
        if trainer.model.training:
            prompts = trainer.processing_class.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
            prompts = [p.split("<|assistant|>")[0].replace("<|user|>", "").strip() for p in prompts]
            batches.append({"prompts": prompts, "answers": [answers.get(p) for p in prompts],
                            "advantages": batch["advantages"].tolist(),
                            "num_items_in_batch": float(batch["num_items_in_batch"])})
        return batch

    trainer._generate_and_score_completions = recording
    trainer.train(resume_from_checkpoint=checkpoint)
    acc = trainer.accelerator
    params = torch.cat([p.detach().double().flatten() for p in trainer.model.parameters()])
    result = {
        "rank": acc.process_index, "num_processes": acc.num_processes, "batches": batches,
        "log_history": trainer.state.log_history, "params": params.tolist()[:256], "param_sum": params.sum().item(),
        "stream": trainer._dynamic_sampler.stream.state_dict(),
    }
    write_rank_result(result_dir, acc, result)


if __name__ == "__main__":
    main(*sys.argv[1:5])
