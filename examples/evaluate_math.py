"""Evaluate a model on math problems: avg@k, pass@k (unbiased) and cons@k (majority vote), scored with math-verify.
The `fipo-trl eval` command (fipo_trl/tools/evaluation.py) as a script; `--help` lists the flags.

    python examples/evaluate_math.py
        Offline smoke run: the embedded tiny model on a tiny built-in problem set.
    python examples/evaluate_math.py --model_name_or_path outputs/my-fipo-run --dataset_name HuggingFaceH4/aime_2024 \
        --dataset_split train --k 32 --max_new_tokens 20480 --output_dir outputs/aime24

Writes <output_dir>/eval_samples.jsonl as samples are generated (a rerun with the same flags resumes from it), then
<output_dir>/eval_results.json (metrics, model-index block, samples) and eval_results.md. A bad flag, column or prompt
template is reported before the model loads, as `evaluate_math.py: error: ...` with exit status 2.
"""

import sys

from fipo_trl.tools.evaluation import main

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as error:  # a bad input: one line naming the flag and the fix, as argparse reports its own
        print(f"evaluate_math.py: error: {error}", file=sys.stderr)
        sys.exit(2)
