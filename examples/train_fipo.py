"""Train a causal LM with FIPO: the `fipo-trl train` command (fipo_trl/tools/cli.py) as a script.

    python examples/train_fipo.py
        The embedded default: builds a tiny Llama and tokenizer locally (no download), trains it with FIPO on
        built-in arithmetic prompts for a few steps on CPU, prints the FIPO metrics, writes the model and card.
    python examples/train_fipo.py --config examples/recipes/qwen2.5-1.5b-single-gpu.yaml
    python examples/train_fipo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/DeepMath-103K \
        --reward_funcs math_verify_reward overlong_penalty
    accelerate launch --config_file <accelerate config> examples/train_fipo.py --config recipe.yaml

Any FIPOConfig / GRPOConfig / transformers TrainingArguments / trl ModelConfig field is a flag (`--help` lists them).
"""

import sys

from fipo_trl.tools.cli import train

if __name__ == "__main__":
    train(sys.argv[1:])
