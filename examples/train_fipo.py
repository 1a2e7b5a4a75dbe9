"""Train a causal LM with FIPO (TRL's GRPO script, with FIPOTrainer/FIPOConfig).

    python examples/train_fipo.py
        The embedded default: builds a tiny Llama and tokenizer locally (no download), trains it with FIPO on
        built-in arithmetic prompts for a few steps on CPU, prints the FIPO metrics, writes the model and card.
    python examples/train_fipo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/DeepMath-103K
    accelerate launch --config_file <accelerate config> examples/train_fipo.py --config recipe.yaml

Any FIPOConfig / GRPOConfig / transformers TrainingArguments field is a flag (`--help` lists them).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field

import torch
from datasets import load_dataset
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.callbacks import PrintFIPOMetricsCallback
from fipo_trl.testing import build_tiny_model, tiny_prompt_dataset

# Used when no --model_name_or_path is given; any of them can still be overridden on the command line.
EMBEDDED_DEFAULTS = dict(
    output_dir="outputs/fipo-tiny", max_steps=16, per_device_train_batch_size=4, num_generations=4,
    max_completion_length=12, learning_rate=5e-3, logging_steps=1, save_strategy="steps", save_steps=8,
    report_to="none", gradient_checkpointing=False, bf16=torch.cuda.is_available(), seed=0, disable_tqdm=False,
    fipo_updates_per_generation=4,
)


@dataclass
class FIPOScriptArguments(ScriptArguments):
    reward_funcs: list[str] = field(
        default_factory=lambda: ["fipo_trl.testing.digit_reward"],
        metadata={"help": "Reward functions as dotted import paths (module.function)."},
    )
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "With a LoRA adapter (--use_peft): also save the base model with the adapter merged in, "
                  "to <output_dir>/merged, loadable without peft."},
    )


def load_reward(path: str):
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"--reward_funcs {path!r}: expected a dotted import path such as 'my_rewards.correctness'.")
    return getattr(importlib.import_module(module), name)


def parse_args(argv: list[str]):
    parser = TrlParser((FIPOScriptArguments, FIPOConfig, ModelConfig))
    if not any(arg.startswith(("--model_name_or_path", "--config")) for arg in argv):
        parser.set_defaults(**EMBEDDED_DEFAULTS)  # defaults only: flags still win
    return parser.parse_args_and_config(argv)


def main(argv: list[str]):
    script_args, training_args, model_args = parse_args(argv)
    if model_args.model_name_or_path is None:
        model_args.model_name_or_path = str(build_tiny_model(f"{training_args.output_dir}/base-model"))
        dataset = {script_args.dataset_train_split: tiny_prompt_dataset(64)}
    else:
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)

    trainer = FIPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=[load_reward(path) for path in script_args.reward_funcs],
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset.get(script_args.dataset_test_split) if training_args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
        callbacks=[PrintFIPOMetricsCallback()],
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(dataset_name=script_args.dataset_name)
    trainer.accelerator.print(f"Model and model card saved to {training_args.output_dir}")
    if script_args.merge_adapter and model_args.use_peft and trainer.accelerator.is_main_process:
        merged_dir = f"{training_args.output_dir}/merged"
        trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(merged_dir)
        trainer.processing_class.save_pretrained(merged_dir)
        trainer.accelerator.print(f"Merged model saved to {merged_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
