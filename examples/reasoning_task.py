"""An offline task where the tiny model can reason longer or shorter, and longer reasoning pays off.

Used by ``examples/long_reasoning_study.py`` (GRPO vs DAPO vs FIPO, several seeds). The problem is the last digit of
a sum of 3-8 digits, each operand numbered in the prompt:

    prompt:  "sum one 6 two 0 three 4 four 8 ?"
    direct:  "the answer is 8 ."                                                   (5 tokens)
    partial: "one 6 = 6 , two 0 = 6 , the answer is 8 ."                           (stops after k < n steps)
    stepwise: "one 6 = 6 , two 0 = 6 , three 4 = 0 , four 8 = 8 , the answer is 8 ."  (5 tokens per operand)

A step names the next operand's number word, copies its digit from the prompt (an induction-head lookup) and writes
the running sum modulo 10; a full chain is 20-45 tokens, long enough for a Future-KL with a 32-token half-life to
matter. The supervised warm start mixes the three kinds of answer, so the model starts out mostly not reasoning:
about a third of its answers are full chains (right ~95 % of the time in the study), the rest are right at about
chance (10 %). Reinforcement learning on a +1 / -1 correctness reward can therefore pay off by reasoning longer
(more full chains) and by reasoning better (fewer wrong steps); the study measures both.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

NUMBER_WORDS = "one two three four five six seven eight nine ten".split()  # all in the tiny tokenizer's vocabulary
ANSWER_PREFIX = "the answer is"
MIN_OPERANDS, MAX_OPERANDS = 3, 8
# Warm-start mixture of answer kinds: mostly direct, so that reasoning longer is something RL has to discover.
WARM_START_MIX = {"direct": 0.4, "partial": 0.2, "stepwise": 0.4}
DEV_SEED = 20_000  # problems for the warm start's competence check; the held-out test set uses another seed
_ANSWER = re.compile(r"the answer is (\d) \.$")
_STEP = re.compile(r"(\w+) (\d) = (\d) ,")


def draw_operands(rng: random.Random) -> list[int]:
    return [rng.randint(0, 9) for _ in range(rng.randint(MIN_OPERANDS, MAX_OPERANDS))]


def prompt_text(operands: list[int]) -> str:
    return "sum " + " ".join(f"{NUMBER_WORDS[i]} {x}" for i, x in enumerate(operands)) + " ?"


def answer_digit(operands: list[int]) -> str:
    return str(sum(operands) % 10)


def target_text(operands: list[int], steps: int) -> str:
    """The first ``steps`` steps of the chain of partial sums, then the final answer (0 steps = a direct answer)."""
    parts, total = [], 0
    for i, x in enumerate(operands[:steps]):
        total = (total + x) % 10
        parts.append(f"{NUMBER_WORDS[i]} {x} = {total} ,")
    return " ".join([*parts, f"{ANSWER_PREFIX} {answer_digit(operands)} ."])


def problems(n: int, *, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [draw_operands(rng) for _ in range(n)]


def task_dataset(n: int, *, seed: int):
    """``n`` problems as a dataset with ``prompt``, ``answer`` and ``operands`` (the reward functions read them)."""
    from datasets import Dataset

    rows = problems(n, seed=seed)
    return Dataset.from_dict({"prompt": [prompt_text(o) for o in rows], "answer": [answer_digit(o) for o in rows],
                              "operands": rows})


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def parse_answer(completion) -> str | None:
    """The digit D of a completion ending in "the answer is D .", else None (broken or cut off)."""
    match = _ANSWER.search(_text(completion).strip())
    return match.group(1) if match else None


def reasoning_steps(completion) -> int:
    """How many well-formed steps open the completion: "one <d> = <d> ,", then "two <d> = <d> ," and so on (the
    number words in order; the digits may be wrong, which costs accuracy, not length)."""
    text, steps, expected_start = _text(completion).strip(), 0, 0
    for match in _STEP.finditer(text):  # each step must start right after the previous one and its space
        if match.start() != expected_start or steps >= len(NUMBER_WORDS) or match.group(1) != NUMBER_WORDS[steps]:
            break
        steps, expected_start = steps + 1, match.end() + 1
    return steps


def is_stepwise(completion, operands: list[int]) -> bool:
    """Whether the completion reasons through every operand (a full chain) before its final answer."""
    return reasoning_steps(completion) >= len(operands) and parse_answer(completion) is not None


# Reward functions in TRL's signature. Only ``correctness_reward`` trains; the other two are logged by TRL at weight 0
# (``rewards/accuracy/mean``, ``rewards/stepwise_share/mean``), which gives the curves for free.
def correctness_reward(completions, answer, **kwargs) -> list[float]:
    """DAPO's rule-based reward: +1 for a well-formed final answer with the right digit, -1 otherwise."""
    return [1.0 if parse_answer(c) == a else -1.0 for c, a in zip(completions, answer)]


def accuracy(completions, answer, **kwargs) -> list[float]:
    return [float(parse_answer(c) == a) for c, a in zip(completions, answer)]


def stepwise_share(completions, operands, **kwargs) -> list[float]:
    return [float(is_stepwise(c, o)) for c, o in zip(completions, operands)]


REWARD_FUNCS = [correctness_reward, accuracy, stepwise_share]
REWARD_WEIGHTS = [1.0, 0.0, 0.0]


def warm_start(base_model: str | Path, output_dir: str | Path, *, max_steps: int = 2000, batch_size: int = 32,
               learning_rate: float = 1e-3, seed: int = 0, target_chain_accuracy: float = 0.5,
               check_every: int = 250) -> tuple[Path, int, bool]:
    """Supervised steps on the mixture ``WARM_START_MIX`` (loss on the completion only, as TRL's SFT) until the
    model's full chains are right ``target_chain_accuracy`` of the time on 128 dev problems (sampled, disjoint from
    the held-out set), checked every ``check_every`` steps, or ``max_steps``; save the model and tokenizer to
    ``output_dir``; return it, the steps taken and whether the target was reached.

    Why a competence target rather than a fixed step count: the chain needs an induction-head lookup, which a
    2-layer model picks up abruptly, after about 500 steps for some initialisations and not within 4,000 for others.
    A fixed count leaves some seeds with no skill to reinforce and others with nothing left to learn; the target
    starts every seed where reasoning longer pays off (chains right at least half the time, direct answers at
    chance). The skill appears abruptly, so a check every 250 steps overshoots the target.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fipo_trl.tools.tiny import supervised_step

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    model.train()
    rng = random.Random(seed)
    kinds, weights = zip(*WARM_START_MIX.items())
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    dev_problems = problems(128, seed=DEV_SEED)
    step, reached = 0, False
    while step < max_steps and not reached:
        pairs = []
        for _ in range(batch_size):
            operands = draw_operands(rng)
            kind = rng.choices(kinds, weights)[0]
            if kind == "partial":
                steps_taken = rng.randint(1, len(operands) - 1)
            else:
                steps_taken = 0 if kind == "direct" else len(operands)
            pairs.append((prompt_text(operands), target_text(operands, steps_taken)))
        supervised_step(model, tokenizer, optimizer, pairs)
        step += 1
        if step % check_every == 0:
            dev = evaluate(model, tokenizer, dev_problems, samples=2, seed=seed)
            reached = dev["accuracy_stepwise"] >= target_chain_accuracy  # NaN (no chains yet) compares False
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir, step, reached


def prepare_model(workdir: str | Path, *, seed: int, max_warm_start_steps: int = 2000, attempts: int = 4,
                  hidden_size: int = 128, target_chain_accuracy: float = 0.5,
                  check_every: int = 250) -> tuple[Path, dict]:
    """Build the tiny Llama (2 layers, width 128: width 64 copies the digits but never learns the sums) and
    warm-start it to the competence target; an initialisation that misses it within ``max_warm_start_steps`` is
    replaced by the next (init seed = seed + 1000 x attempt), up to ``attempts`` times. ``target_chain_accuracy``
    and ``check_every`` are the warm start's competence target and how often it is checked. Returns the warm-started
    path and ``{"init_seed", "steps", "reached"}`` of the attempt kept (the last one if none reached it)."""
    from fipo_trl.tools.tiny import build_tiny_model

    workdir = Path(workdir)
    for attempt in range(attempts):
        init_seed = seed + 1000 * attempt
        base = build_tiny_model(workdir / f"base-model-{attempt}", seed=init_seed, hidden_size=hidden_size)
        path, steps, reached = warm_start(base, workdir / f"warm-start-{attempt}", max_steps=max_warm_start_steps,
                                          seed=init_seed, target_chain_accuracy=target_chain_accuracy,
                                          check_every=check_every)
        if reached:
            break
    return path, {"init_seed": init_seed, "steps": steps, "reached": reached}


@torch.no_grad()
def evaluate(model, tokenizer, operand_lists: list[list[int]], *, samples: int = 4, temperature: float = 1.0,
             seed: int = 0, max_new_tokens: int = 64, batch_size: int = 512) -> dict[str, float]:
    """``samples`` completions per held-out problem at the training temperature (the paper's avg@k), from a fixed
    sampling seed: accuracy (avg@k), share of full chains, accuracy of full chains and of the rest, mean completion
    length in tokens, and one example. Greedy decoding would hide the mix of direct answers and chains that RL
    chooses between."""
    was_training = model.training
    model.eval()
    texts, expected = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        repeated = [o for o in operand_lists for _ in range(samples)]
        for start in range(0, len(repeated), batch_size):
            chunk = repeated[start:start + batch_size]
            batch = tokenizer([prompt_text(o) for o in chunk], return_tensors="pt", padding=True).to(model.device)
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                    top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id)
            texts += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            expected += chunk
    model.train(was_training)
    correct = [parse_answer(t) == answer_digit(o) for t, o in zip(texts, expected)]
    chains = [is_stepwise(t, o) for t, o in zip(texts, expected)]
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]

    def rate(values: list[bool]) -> float:
        return sum(values) / len(values) if values else float("nan")

    return {
        "accuracy": rate(correct),
        "stepwise_share": rate(chains),
        "accuracy_stepwise": rate([c for c, s in zip(correct, chains) if s]),
        "accuracy_other": rate([c for c, s in zip(correct, chains) if not s]),
        "mean_length": sum(lengths) / len(lengths),
        "example": texts[0],
    }
