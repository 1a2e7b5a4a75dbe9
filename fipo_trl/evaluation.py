"""``fipo-trl eval`` / ``examples/evaluate_math.py``: sample k completions per problem, score avg@k, pass@k, cons@k.

Generation uses vLLM when it is installed and a GPU is present (``--use_vllm`` forces it on or off), else
transformers ``generate``. Scoring uses the ``math_metrics`` evaluate metric shipped in fipo_trl
(``evaluate.load(fipo_trl.math_metrics.METRIC_PATH)``). Writes ``<output_dir>/eval_results.json`` (metrics, the
``eval_results`` mapping that ``FIPOTrainer.create_model_card(eval_results=...)`` takes, a ``model-index`` block for a
model card, and every sample) and ``<output_dir>/eval_results.md`` (a markdown table).

With no model it evaluates the embedded tiny model (built locally) on a tiny built-in problem set: an offline smoke
run.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# A tiny problem set in the tiny model's vocabulary, for the offline smoke run.
BUILTIN_PROBLEMS = [
    {"problem": "what is one plus one ?", "answer": "2"},
    {"problem": "what is two plus three ?", "answer": "5"},
    {"problem": "what is four plus four ?", "answer": "8"},
    {"problem": "what is three plus one ?", "answer": "4"},
]


@dataclass
class EvalArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model to evaluate. Default: the embedded tiny model (built locally)."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Dataset (Hub id, local folder, or a .json/.jsonl/.parquet file). "
                                "Default: a tiny built-in problem set."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_split: str = field(default="test", metadata={"help": "Split to evaluate (a single-file dataset: train)."})
    problem_column: str = field(default="problem", metadata={"help": "Column holding the problem text."})
    answer_column: str = field(default="answer", metadata={"help": "Column holding the reference answer."})
    prompt_template: str = field(
        default="{problem}",
        metadata={"help": "Prompt built from each problem ({problem} is replaced), e.g. the DAPO-Math instruction "
                  "'Solve the following math problem step by step. The last line of your response should be of the "
                  "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\\n\\n{problem}"
                  "\\n\\nRemember to put your answer on its own line after \"Answer:\".'"})
    use_chat_template: bool = field(
        default=True, metadata={"help": "Wrap the prompt as a user message with the tokenizer's chat template "
                                "(when it has one)."})
    num_problems: int | None = field(default=None, metadata={"help": "Evaluate only the first N problems."})
    k: int = field(default=4, metadata={"help": "Samples per problem n (avg@n, and the largest k)."})
    pass_k: list[int] | None = field(
        default=None, metadata={"help": "The k of pass@k and cons@k (each <= --k). Default: 1 and --k."})
    max_new_tokens: int = field(default=1024, metadata={"help": "Completion length limit."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature. Official validation: 1.0."})
    top_p: float = field(default=0.7, metadata={"help": "Nucleus sampling. Official validation (AIME): 0.7."})
    batch_size: int = field(default=8, metadata={"help": "Problems per transformers generate call."})
    use_vllm: bool | None = field(
        default=None, metadata={"help": "Generate with vLLM. Default: when vLLM is installed and a GPU is present."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype (auto, bfloat16, float16, float32)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    timeout_seconds: float = field(default=5.0, metadata={"help": "Hard limit of one math-verify check."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where eval_results.json/.md are written."})


def load_problems(args: EvalArguments) -> tuple[list[str], list[str], str]:
    """(problems, reference answers, dataset name)."""
    if args.dataset_name is None:
        rows, name = BUILTIN_PROBLEMS, "builtin-tiny-arithmetic"
    else:
        from datasets import load_dataset

        path = Path(args.dataset_name)
        if path.is_file():  # a single local file: datasets names its only split "train"
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}[path.suffix]
            rows = load_dataset(builder, data_files=str(path), split="train")
        else:
            rows = load_dataset(args.dataset_name, name=args.dataset_config, split=args.dataset_split)
        name = args.dataset_name
    rows = list(rows)[: args.num_problems]
    return [r[args.problem_column] for r in rows], [str(r[args.answer_column]) for r in rows], name


def build_prompts(tokenizer, problems: list[str], args: EvalArguments) -> list[str]:
    texts = [args.prompt_template.format(problem=p) for p in problems]
    if args.use_chat_template and getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
    return texts


def generate_transformers(model_path: str, prompts: list[str], args: EvalArguments) -> list[list[str]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=args.dtype).to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(args.seed)
    completions = []
    for start in range(0, len(prompts), args.batch_size):
        batch = tokenizer(prompts[start:start + args.batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, temperature=args.temperature, top_p=args.top_p,
                                 max_new_tokens=args.max_new_tokens, num_return_sequences=args.k,
                                 pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].size(1):], skip_special_tokens=True)
        completions += [texts[i:i + args.k] for i in range(0, len(texts), args.k)]
    return completions


def generate_vllm(model_path: str, prompts: list[str], args: EvalArguments) -> list[list[str]]:  # GPU only
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, dtype=args.dtype, seed=args.seed)
    params = SamplingParams(n=args.k, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens,
                            seed=args.seed)
    return [[o.text for o in result.outputs] for result in llm.generate(prompts, params)]


def model_index(model_name: str, dataset_name: str, split: str, metrics: dict[str, float]) -> list[dict]:
    """The model card's ``model-index`` block (Hugging Face Hub format) for these results."""
    return [{"name": model_name, "results": [{
        "task": {"type": "text-generation", "name": "Mathematical reasoning"},
        "dataset": {"name": dataset_name, "type": dataset_name, "split": split},
        "metrics": [{"type": name, "name": name, "value": value} for name, value in metrics.items()],
    }]}]


def markdown_table(model_name: str, dataset_name: str, metrics: dict[str, float]) -> str:
    names = list(metrics)
    return "\n".join([
        "| model | dataset | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
        f"| {model_name} | {dataset_name} | " + " | ".join(f"{100 * metrics[n]:.1f}" for n in names) + " |",
        "", "Scores in %. avg@n: mean accuracy of n samples per problem; pass@k: unbiased estimator; cons@k: majority "
        "vote over k samples (math-verify equivalence).", "",
    ])


def evaluate_math(args: EvalArguments) -> dict:
    from fipo_trl.math_metrics import load_math_metric

    output_dir = Path(args.output_dir)
    model_path = args.model_name_or_path
    if model_path is None:
        from fipo_trl.testing import build_tiny_model

        model_path = str(build_tiny_model(output_dir / "base-model"))
    problems, references, dataset_name = load_problems(args)
    from transformers import AutoTokenizer

    prompts = build_prompts(AutoTokenizer.from_pretrained(model_path), problems, args)
    use_vllm = args.use_vllm
    if use_vllm is None:
        use_vllm = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    completions = (generate_vllm if use_vllm else generate_transformers)(model_path, prompts, args)

    scores = load_math_metric().compute(predictions=completions, references=references,
                                        k=args.pass_k or sorted({1, args.k}), timeout_seconds=args.timeout_seconds)
    counts = scores.pop("correct_counts")
    metrics = {name: float(value) for name, value in scores.items() if "@" in name}
    model_name = Path(model_path).name if args.model_name_or_path is None else args.model_name_or_path
    results = {
        "model": model_name, "dataset": dataset_name, "split": args.dataset_split, "metrics": metrics,
        "num_problems": scores["num_problems"], "num_samples": scores["num_samples"],
        "eval_results": {dataset_name: metrics},
        "model-index": model_index(model_name, dataset_name, args.dataset_split, metrics),
        "generation": {"backend": "vllm" if use_vllm else "transformers", "temperature": args.temperature,
                       "top_p": args.top_p, "max_new_tokens": args.max_new_tokens},
        "args": asdict(args),
        "samples": [{"problem": p, "reference": r, "completions": c, "num_correct": n}
                    for p, r, c, n in zip(problems, references, completions, counts)],
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
    table = markdown_table(model_name, dataset_name, metrics)
    (output_dir / "eval_results.md").write_text(table)
    print(table)
    print(f"Results written to {output_dir / 'eval_results.json'} and {output_dir / 'eval_results.md'}")
    return results


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser

    (args,) = TrlParser((EvalArguments,), prog="fipo-trl eval").parse_args_and_config(argv)
    return evaluate_math(args)
