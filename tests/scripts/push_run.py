"""Launched by tests/trainer/test_hub.py with HF_ENDPOINT pointing at a Hub stand-in (or at nothing): trains the tiny
model with push_to_hub, then pushes the final model with its card."""

import argparse

from peft import LoraConfig

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.tools.tiny import digit_reward, tiny_prompt_dataset


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_path")
    parser.add_argument("output_dir")
    parser.add_argument("--hub_model_id", required=True)
    parser.add_argument("--hub_token")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--private", action="store_true")
    cli = parser.parse_args()
    args = FIPOConfig(
        output_dir=cli.output_dir, bf16=False, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, max_steps=4, learning_rate=1e-2, fipo_updates_per_generation=2, report_to="none",
        logging_steps=1, save_strategy="steps", save_steps=2, gradient_checkpointing=False, disable_tqdm=True,
        push_to_hub=True, hub_model_id=cli.hub_model_id, hub_strategy="every_save", hub_private_repo=cli.private,
        hub_token=cli.hub_token,
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") \
        if cli.lora else None
    trainer = FIPOTrainer(model=cli.model_path, reward_funcs=digit_reward, args=args,
                          train_dataset=tiny_prompt_dataset(16), peft_config=peft_config)
    trainer.train()
    trainer.push_to_hub(dataset_name="fipo-user/tiny-arithmetic")
    print("PUSH SCRIPT DONE", flush=True)


if __name__ == "__main__":
    main()
