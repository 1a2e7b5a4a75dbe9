"""Pick the task: how often SmolLM2-135M-Instruct writes a parsable answer, and a correct one, per format and level.

    python examples/real_model/measure.py --levels 2d+1d --formats answer_line boxed --num_problems 64
    python examples/real_model/measure.py --model outputs/real-model-fipo      # the same numbers for a trained model

For each (level, format) it samples one completion per dev problem (temperature 1.0, top_p 1.0: the trainer's
sampling) with transformers ``generate`` and scores every prefix of 32 / 48 / 64 ... tokens with the training reward
(``math_verify_reward``): a prefix of a sampled completion is what a run with that ``max_completion_length`` would
have sampled, so one generation measures every length. Problems come from the dev slice of ``task.split`` (never
the held-out test slice); a level too small for the split uses a seeded sample of all its problems.
Prints one line per setting and appends it as JSON to ``--output`` (default ``measure_results.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare import DEFAULT_FOLDER  # noqa: E402
from task import FORMATS, LEVELS, SEED, _pairs, answer, split  # noqa: E402


def dev_problems(level: str, n: int) -> list:
    try:
        problems = split(level)["dev"]
    except ValueError:  # a level too small for a test + dev + train split
        problems = sorted(_pairs(level))
        random.Random(SEED).shuffle(problems)
    return problems[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_FOLDER))
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--num_problems", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 48, 64])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("measure_results.jsonl"))
    parser.add_argument("--show", type=int, default=3, help="Completions printed per setting.")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fipo_trl.rewards import MathVerifyReward, extract_answer

    reward = MathVerifyReward()
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    max_len = max(args.lengths)
    for level in args.levels:
        problems = dev_problems(level, args.num_problems)
        for fmt in args.formats:
            texts = [tokenizer.apply_chat_template(FORMATS[fmt](*p), tokenize=False, add_generation_prompt=True)
                     for p in problems]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            torch.manual_seed(args.seed)
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**batch, do_sample=True, temperature=args.temperature, top_p=args.top_p,
                                     top_k=0, max_new_tokens=max_len, pad_token_id=tokenizer.pad_token_id)
            seconds = time.perf_counter() - start
            ids = out[:, batch["input_ids"].size(1):]
            result = {"level": level, "format": fmt, "n": len(problems), "model": args.model,
                      "prompt_tokens": int(batch["attention_mask"].sum(1).float().mean()),
                      "generate_s": round(seconds, 1), "temperature": args.temperature, "top_p": args.top_p}
            for length in args.lengths:
                completions = tokenizer.batch_decode(ids[:, :length], skip_special_tokens=True)
                refs = [str(answer(*p)) for p in problems]
                parsed = sum(extract_answer(c) is not None for c in completions)
                correct = sum(reward.score(c, r) == 1.0 for c, r in zip(completions, refs))
                result[f"parsed@{length}"] = round(parsed / len(problems), 3)
                result[f"correct@{length}"] = round(correct / len(problems), 3)
            full = tokenizer.batch_decode(ids, skip_special_tokens=True)
            result["finished"] = round(float((ids == tokenizer.eos_token_id).any(1).float().mean()), 3)
            print(json.dumps(result), flush=True)
            for text in full[:args.show]:
                print("   ", repr(text[:200]), flush=True)
            with args.output.open("a") as f:
                f.write(json.dumps(result) + "\n")
    reward.verifier.close()


if __name__ == "__main__":
    main()
