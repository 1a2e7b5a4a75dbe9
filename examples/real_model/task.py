"""The arithmetic task for SmolLM2-135M-Instruct: problems, prompt formats and the seeded train / dev / test split.

    python examples/real_model/task.py          # (re)writes examples/real_model/data/, the recipe's data (committed)

Everything is generated from code with a fixed seed (no download). Every problem of a level is enumerated, shuffled
once with the seed and cut into disjoint slices: test (held out, for ``fipo-trl eval``), dev (used only to pick the
level, the prompt format and the completion length, ``measure.py``) and train (the rest, for ``fipo-trl train``). A
problem is in one slice only, whatever the operand order (``a + b`` and ``b + a`` share a slice), and the few-shot
examples of the prompts are in none.

The chosen setting (measured on the dev slice, docs/real_model.md): level ``upto20`` (a + b and a - b with a, b in
1..20, non-negative results; 609 problems: 301 test, 100 dev, 208 train) and format ``chat_fewshot_answer`` (one
worked example as a user/assistant turn, then the question; the answer is asked for as a final ``Answer: N`` line,
which ``math_verify_reward`` reads).

Files written to ``--output_dir``:

* ``train.jsonl`` and ``test.jsonl``: ``prompt`` (chat messages) and ``solution`` (the answer): what
  ``fipo-trl train --dataset_name train.jsonl`` and ``math_verify_reward`` read.
* ``test_eval.jsonl`` and ``dev_eval.jsonl``: ``problem`` and ``answer`` for ``fipo-trl eval``, plus ``question``
  (for reading). ``fipo-trl eval`` wraps a problem as ONE user message; a few-shot turn cannot be written that way,
  so ``problem`` is the prompt already rendered with the model's chat template (generation prompt included) and eval
  runs with ``--use_chat_template false``: the prompt's token ids are then exactly the trainer's
  (``tests/cli/test_real_model.py`` checks it). Rendering needs the model's tokenizer (``--model``, default the folder
  ``prepare.py`` writes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = HERE / "data"

# The chosen setting (picked on the dev slice with measure.py; see docs/real_model.md).
DEFAULT_LEVEL = "upto20"
DEFAULT_FORMAT = "chat_fewshot_answer"
SEED = 1234
TEST_SIZE = 300
DEV_SIZE = 100


def _pairs(level: str) -> list[tuple[int, str, int]]:
    """Every problem (a, op, b) of a level, in a fixed order."""
    if level == "1d+1d":  # one-digit + one-digit
        return [(a, "+", b) for a in range(1, 10) for b in range(1, 10)]
    if level == "upto20":  # a +/- b with a, b in 1..20, non-negative results
        return [(a, op, b) for a in range(1, 21) for b in range(1, 21) for op in ("+", "-") if op == "+" or a >= b]
    if level == "2d+1d":  # two-digit +/- one-digit, non-negative results
        return [(a, op, b) for a in range(10, 100) for b in range(1, 10) for op in ("+", "-")]
    if level == "2d+2d":  # two-digit +/- two-digit, non-negative results
        return [(a, op, b) for a in range(10, 100) for b in range(10, 100) for op in ("+", "-") if op == "+" or a >= b]
    raise ValueError(f"unknown level {level!r}: one of {', '.join(LEVELS)}")


LEVELS = ("1d+1d", "upto20", "2d+1d", "2d+2d")


def answer(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def question(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}?"


# Prompt formats: each returns the chat messages of the prompt (measure.py compares them on the dev slice).
def _boxed(a, op, b):
    return [{"role": "user", "content": f"{question(a, op, b)} Put the final answer in \\boxed{{}}."}]


def _answer_line(a, op, b):
    return [{"role": "user", "content": f"{question(a, op, b)} End your reply with a line of the form "
                                        "\"Answer: N\" where N is the number."}]


_EXAMPLE = (34, "+", 5)
_EXAMPLE2 = (12, "-", 7)
EXAMPLES = (_EXAMPLE, _EXAMPLE2)  # the few-shot examples: left out of every slice


def _fewshot_answer(a, op, b):
    ea, eop, eb = _EXAMPLE
    return [{"role": "user", "content": "Solve the arithmetic problem. The last line of your reply must be "
                                        "\"Answer: N\" where N is the number.\n\n"
                                        f"Example:\n{question(ea, eop, eb)}\n{ea} {eop} {eb} = {answer(ea, eop, eb)}\n"
                                        f"Answer: {answer(ea, eop, eb)}\n\nNow you:\n{question(a, op, b)}"}]


def _fewshot_boxed(a, op, b):
    ea, eop, eb = _EXAMPLE
    return [{"role": "user", "content": "Solve the arithmetic problem and put the final answer in \\boxed{}.\n\n"
                                        f"Example:\n{question(ea, eop, eb)}\n{ea} {eop} {eb} = "
                                        f"\\boxed{{{answer(ea, eop, eb)}}}\n\nNow you:\n{question(a, op, b)}"}]


def _system_answer(a, op, b):
    return [{"role": "system", "content": "You are a calculator. Reply with the calculation and then a final line "
                                          "\"Answer: N\" where N is the number."},
            {"role": "user", "content": question(a, op, b)}]


def _chat_fewshot_answer(a, op, b):  # the chosen format
    ea, eop, eb = _EXAMPLE
    instruction = " End your reply with a line of the form \"Answer: N\" where N is the number."
    worked = f"{ea} {eop} {eb} = {answer(ea, eop, eb)}\nAnswer: {answer(ea, eop, eb)}"
    return [{"role": "user", "content": question(ea, eop, eb) + instruction},
            {"role": "assistant", "content": worked},
            {"role": "user", "content": question(a, op, b) + instruction}]


def _chat_fewshot2_answer(a, op, b):  # two example turns
    instruction = " End your reply with a line of the form \"Answer: N\" where N is the number."
    messages = []
    for ea, eop, eb in EXAMPLES:
        messages += [{"role": "user", "content": question(ea, eop, eb) + instruction},
                     {"role": "assistant", "content": f"{ea} {eop} {eb} = {answer(ea, eop, eb)}\n"
                                                      f"Answer: {answer(ea, eop, eb)}"}]
    return messages + [{"role": "user", "content": question(a, op, b) + instruction}]


FORMATS = {"boxed": _boxed, "answer_line": _answer_line, "fewshot_answer": _fewshot_answer,
           "fewshot_boxed": _fewshot_boxed, "system_answer": _system_answer,
           "chat_fewshot_answer": _chat_fewshot_answer, "chat_fewshot2_answer": _chat_fewshot2_answer}


def split(level: str, seed: int = SEED, test_size: int = TEST_SIZE, dev_size: int = DEV_SIZE) -> dict[str, list]:
    """Disjoint test / dev / train slices of every problem of the level. Problems that differ only in operand order
    (a + b, b + a) are kept together in one slice; the few-shot examples are in none."""
    groups: dict[tuple, list] = {}
    for a, op, b in _pairs(level):
        if (a, op, b) in EXAMPLES or (op == "+" and (b, op, a) in EXAMPLES):
            continue
        key = (min(a, b), op, max(a, b)) if op == "+" else (a, op, b)
        groups.setdefault(key, []).append((a, op, b))
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    slices, rest = {"test": [], "dev": [], "train": []}, list(keys)
    for name, size in (("test", test_size), ("dev", dev_size)):
        while rest and len(slices[name]) < size:
            slices[name].extend(groups[rest.pop(0)])
    slices["train"] = [p for key in rest for p in groups[key]]
    random.Random(seed + 1).shuffle(slices["train"])
    if not slices["train"]:
        raise ValueError(f"level {level!r} has {sum(map(len, groups.values()))} problems: too few for a test slice of "
                         f"{test_size}, a dev slice of {dev_size} and a training set.")
    return slices


def rows(problems, fmt: str) -> list[dict]:
    """Training rows: ``prompt`` (chat messages) and ``solution``."""
    return [{"prompt": FORMATS[fmt](a, op, b), "solution": str(answer(a, op, b))} for a, op, b in problems]


def render(tokenizer, messages: list[dict]) -> str:
    """The prompt text the trainer feeds the model: the chat template with the generation prompt."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def eval_rows(problems, fmt: str, tokenizer) -> list[dict]:
    """``fipo-trl eval`` rows (``--use_chat_template false``): ``problem`` (the rendered prompt), ``answer`` and
    ``question``."""
    return [{"problem": render(tokenizer, FORMATS[fmt](a, op, b)), "answer": str(answer(a, op, b)),
             "question": question(a, op, b)} for a, op, b in problems]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_data(output_dir: Path = DEFAULT_DATA_DIR, level: str = DEFAULT_LEVEL, fmt: str = DEFAULT_FORMAT,
               seed: int = SEED, test_size: int = TEST_SIZE, dev_size: int = DEV_SIZE,
               tokenizer=None) -> dict[str, Path]:
    """Write the JSONL files (deterministic: the same arguments give the same bytes). Returns their paths.
    ``tokenizer`` (renders the eval prompts): a tokenizer or a model folder; default the prepared model's folder."""
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        if tokenizer is None:  # prepare.py's folder (loaded by path: nothing is added to sys.path)
            spec = importlib.util.spec_from_file_location("real_model_prepare", HERE / "prepare.py")
            prepare = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(prepare)
            tokenizer = prepare.DEFAULT_FOLDER
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    slices = split(level, seed, test_size, dev_size)
    files = {"train.jsonl": rows(slices["train"], fmt), "test.jsonl": rows(slices["test"], fmt),
             "test_eval.jsonl": eval_rows(slices["test"], fmt, tokenizer),
             "dev_eval.jsonl": eval_rows(slices["dev"], fmt, tokenizer)}
    paths = {}
    for name, records in files.items():
        paths[name] = output_dir / name
        _write_jsonl(paths[name], records)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--level", default=DEFAULT_LEVEL, choices=LEVELS)
    parser.add_argument("--format", default=DEFAULT_FORMAT, choices=list(FORMATS))
    parser.add_argument("--model", default=None, help="Tokenizer folder for the eval prompts (default: the folder "
                        "prepare.py writes).")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--test_size", type=int, default=TEST_SIZE)
    parser.add_argument("--dev_size", type=int, default=DEV_SIZE)
    args = parser.parse_args()
    paths = write_data(args.output_dir, args.level, args.format, args.seed, args.test_size, args.dev_size, args.model)
    for name, path in paths.items():
        print(f"{name}: {path} ({sum(1 for _ in path.open())} rows)")


if __name__ == "__main__":
    main()
