"""Evaluate a model on math problems: avg@k, pass@k (unbiased) and cons@k (majority vote), scored with math-verify.
The `fipo-trl eval` command (fipo_trl/evaluation.py) as a script; `--help` lists the flags.

    python examples/evaluate_math.py
        Offline smoke run: the embedded tiny model on a tiny built-in problem set.
    python examples/evaluate_math.py --model_name_or_path outputs/my-fipo-run --dataset_name HuggingFaceH4/aime_2024 \
        --dataset_split train --k 32 --max_new_tokens 20480 --output_dir outputs/aime24

Writes <output_dir>/eval_results.json (metrics, model-index block, samples) and eval_results.md.
"""

import sys

from fipo_trl.evaluation import main

if __name__ == "__main__":
    main(sys.argv[1:])
