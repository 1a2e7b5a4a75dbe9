"""``fipo-trl eval`` / ``examples/evaluate_math.py``: sample k completions per problem, score avg@k, pass@k, cons@k.

Generation uses vLLM when it is installed and a GPU is present (``--use_vllm`` forces it on or off), else
transformers ``generate``. Scoring uses the ``math_metrics`` evaluate metric shipped in fipo_trl
(``evaluate.load(fipo_trl.tools.math_metrics.METRIC_PATH)``). Writes ``<output_dir>/eval_results.json`` (metrics, the
``eval_results`` mapping that ``FIPOTrainer.create_model_card(eval_results=...)`` takes, a ``model-index`` block for a
model card, and every sample) and ``<output_dir>/eval_results.md`` (a markdown table).

Every argument, the dataset's columns and the prompt template are checked before the model is loaded (``validate``,
``load_problems``): a bad one raises ValueError naming the flag and the fix. Samples are appended to
``<output_dir>/eval_samples.jsonl`` as each generate call finishes, so a crash keeps them, and a rerun with the same
arguments resumes from that file (its header line holds the arguments; a rerun with different ones is refused rather
than mixing samples of two settings).

With no model it evaluates the embedded tiny model (built locally) on a tiny built-in problem set: an offline smoke
run.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import string
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from numbers import Real
from pathlib import Path

import torch

from fipo_trl.safety.checkpoint_files import saving_marker
from fipo_trl.safety.data import (
    DATA_FILE_BUILDERS,
    check_data_file,
    check_dataset_source,
    data_file_builder,
    supported_files,
)
from fipo_trl.safety.eval_samples import (
    append_samples,
    read_saved_samples,
    sampling_header,
    write_atomically,
)
from fipo_trl.safety.inputs import check_config_file, check_output_dir, checking_inputs, is_int

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
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (0: greedy). Official validation: 1.0."})
    top_p: float = field(default=0.7, metadata={"help": "Nucleus sampling. Official validation (AIME): 0.7."})
    batch_size: int = field(
        default=8, metadata={"help": "Problems per generate call (transformers, and vLLM: raise it there); each "
                             "call's "
                             "samples are saved to eval_samples.jsonl as soon as it returns."})
    use_vllm: bool | None = field(
        default=None, metadata={"help": "Generate with vLLM. Default: when vLLM is installed and a GPU is present."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, bfloat16, float16 or float32."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    timeout_seconds: float = field(default=5.0, metadata={"help": "Hard limit of one math-verify check."})
    output_dir: str = field(
        default="outputs/eval", metadata={"help": "Where eval_samples.jsonl (written as samples are generated; a "
                                          "rerun resumes from it) and eval_results.json/.md are written."})


# Suffixes that can only mean a local file (a Hub id like "org/name-v1.5" may well have some other "suffix").
FILE_LIKE_SUFFIXES = {*DATA_FILE_BUILDERS, ".txt", ".tsv", ".xlsx", ".xls", ".gz", ".bz2", ".xz", ".zip", ".tar"}
SAMPLES_FILE = "eval_samples.jsonl"
DTYPES = ("auto", "bfloat16", "float16", "float32")  # what both transformers and vLLM load a model in
TINY_MODEL_DIR = "base-model"



# --- Validation: every check runs before the model is loaded ---------------------------------------------------

def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and value == value  # value == value: not NaN


def check_prompt_template(template) -> None:
    """The template must be a str.format string whose only placeholder is {problem}."""
    literal = "Write literal braces doubled ({{ and }}, e.g. \\boxed{{}})."
    if not isinstance(template, str):
        raise ValueError(f"--prompt_template must be text, got {template!r}.")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:  # "Single '}' encountered in format string", "unmatched '{' in format spec", ...
        raise ValueError(f"--prompt_template {template!r} has broken braces ({error}). Fix: put {{problem}} where "
                         f"the problem goes. {literal}") from error
    unknown = sorted({"{" + name + "}" for name in fields if name != "problem"})
    if unknown:
        raise ValueError(f"--prompt_template {template!r} has unknown placeholder(s) {', '.join(unknown)}: the only "
                         f"one is {{problem}}. Fix: rename it to {{problem}}. {literal}")
    if "problem" not in fields:
        raise ValueError(f"--prompt_template {template!r} has no {{problem}} placeholder, so every prompt would be "
                         "the same text. Fix: put {problem} where the problem goes.")
    try:
        template.format(problem="1 + 1")
    except (ValueError, IndexError, KeyError, AttributeError) as error:  # e.g. a format spec: {problem:d}
        raise ValueError(f"--prompt_template {template!r} cannot be filled in ({error}). Fix: write the placeholder "
                         f"as plain {{problem}}. {literal}") from error


def dataset_file(name: str) -> Path | None:
    """The local data file --dataset_name names (checked: it exists and has a supported suffix), or None for a
    dataset folder or a Hub id."""
    path = Path(name).expanduser()
    supported = supported_files()
    if path.is_dir():
        check_dataset_source(name)
        return None
    if path.is_file():
        if data_file_builder(path) is None:
            raise ValueError(f"--dataset_name {name!r}: unsupported file type {path.suffix or '(no suffix)'!r}. Fix: "
                             f"convert it to one of {supported} (e.g. JSON lines, one object per problem with the "
                             "--problem_column and --answer_column fields), or pass a Hub dataset id.")
        return path
    if path.suffix.lower() in FILE_LIKE_SUFFIXES or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise ValueError(f"--dataset_name {name!r}: no such file or folder. Fix: check the path (relative paths "
                         f"start from {os.getcwd()}); data files can be {supported}.")
    return None  # a Hub id


def validate(args: EvalArguments) -> None:
    """Check every argument (not the dataset's contents, see ``load_problems``); raise ValueError naming the flag
    and the fix. Cheap: nothing is loaded."""
    def bad(flag, value, rule, fix):
        return ValueError(f"--{flag} {value!r}: {rule}. Fix: {fix}.")

    if not is_int(args.k) or args.k < 1:
        raise bad("k", args.k, "the number of samples per problem must be an integer >= 1", "pass e.g. --k 4")
    if args.pass_k is not None and not isinstance(args.pass_k, (list, tuple)):
        raise bad("pass_k", args.pass_k, "must be a list of integers", "pass e.g. --pass_k 1 4 (in YAML: [1, 4])")
    for value in args.pass_k or []:
        if not is_int(value):
            raise bad("pass_k", args.pass_k, f"each value must be an integer in [1, --k={args.k}], got {value!r}",
                      "pass integers, e.g. --pass_k 1 4")
        if not 1 <= value <= args.k:
            raise bad("pass_k", args.pass_k, f"each value must be in [1, --k={args.k}] (pass@k and cons@k need k of "
                      f"the --k samples), got {value}",
                      f"raise --k to {value}, or drop {value} from --pass_k" if value > args.k else "drop it")
    if args.num_problems is not None and (not is_int(args.num_problems) or args.num_problems < 1):
        raise bad("num_problems", args.num_problems, "must be an integer >= 1", "pass a positive count, or leave it "
                  "unset to evaluate every problem")
    if not _is_number(args.temperature) or args.temperature < 0:
        raise bad("temperature", args.temperature, "must be >= 0", "pass 0 for greedy decoding, or the official 1.0")
    if not _is_number(args.top_p) or not 0 < args.top_p <= 1:
        raise bad("top_p", args.top_p, "must be in (0, 1]", "pass e.g. the official 0.7, or 1 for no nucleus cut")
    if not is_int(args.max_new_tokens) or args.max_new_tokens < 1:
        raise bad("max_new_tokens", args.max_new_tokens, "must be an integer >= 1", "pass e.g. --max_new_tokens 1024")
    if not is_int(args.batch_size) or args.batch_size < 1:
        raise bad("batch_size", args.batch_size, "must be an integer >= 1", "pass e.g. --batch_size 8")
    if not _is_number(args.timeout_seconds) or args.timeout_seconds <= 0:
        raise bad("timeout_seconds", args.timeout_seconds, "must be > 0", "pass e.g. --timeout_seconds 5")
    if not is_int(args.seed):
        raise bad("seed", args.seed, "must be an integer", "pass e.g. --seed 0")
    if args.dtype not in DTYPES:  # float8_e4m3fn is a torch dtype too, but no model loads in it
        raise bad("dtype", args.dtype, f"a model is loaded in one of {', '.join(DTYPES)}",
                  "pass auto, bfloat16, float16 or float32")
    if args.use_vllm and importlib.util.find_spec("vllm") is None:
        raise bad("use_vllm", args.use_vllm, "vLLM is not installed", "pip install vllm, or drop --use_vllm to "
                  "generate with transformers")
    check_prompt_template(args.prompt_template)
    model = args.model_name_or_path
    if model is not None and not Path(model).expanduser().exists() and (
            model.startswith(("/", "./", "../", "~")) or model.count("/") > 1):  # a local path (not a Hub id)
        raise bad("model_name_or_path", model, "no such folder", "pass the folder of a saved model (e.g. a training "
                  "run's output_dir or one of its checkpoint-<step> folders), or a Hub model id")
    if args.dataset_name is not None:
        dataset_file(args.dataset_name)
    check_output_dir(args.output_dir)  # a file, under a file, read-only or empty: before the model loads
    if (Path(args.output_dir) / SAMPLES_FILE).is_dir():
        raise bad("output_dir", args.output_dir, f"{SAMPLES_FILE} in it is a folder", "pass another --output_dir")


def load_problems(args: EvalArguments) -> tuple[list[str], list[str], str]:
    """(problems, reference answers, dataset name). Checks the columns and their values; raises ValueError naming
    the flag (and the columns that do exist)."""
    from datasets import Dataset, load_dataset

    if args.dataset_name is None:
        rows, name = Dataset.from_list(BUILTIN_PROBLEMS), "builtin-tiny-arithmetic"
    else:
        name, path = args.dataset_name, dataset_file(args.dataset_name)
        if path is not None:
            check_data_file(path, "--dataset_name")  # a damaged file is named with its line, not wrapped below
        try:
            if path is not None:
                rows = load_dataset(data_file_builder(path), data_files=str(path), split="train")
            else:
                rows = load_dataset(name, name=args.dataset_config, split=args.dataset_split)
        except Exception as error:  # noqa: BLE001 - whatever went wrong, it is about the flags that chose the data
            raise ValueError(
                f"--dataset_name {name!r} (--dataset_config {args.dataset_config!r}, --dataset_split "
                f"{args.dataset_split!r}) could not be loaded: {type(error).__name__}: {error}. Fix: check the name, "
                "config and split; offline, only local files and datasets in the cache load.") from error
    for flag, column in (("problem_column", args.problem_column), ("answer_column", args.answer_column)):
        if column not in rows.column_names:
            raise ValueError(f"--{flag} {column!r} is not a column of {name}; its columns are {rows.column_names}. "
                             f"Fix: pass --{flag} <one of them>.")
    if len(rows) == 0:
        raise ValueError(f"--dataset_name {name!r} (split {args.dataset_split!r}) has no rows. Fix: pick another "
                         "split or dataset.")
    rows = rows.select(range(min(len(rows), args.num_problems or len(rows))))
    problems, references = list(rows[args.problem_column]), list(rows[args.answer_column])
    for i, problem in enumerate(problems):
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(f"--problem_column {args.problem_column!r}: row {i} of {name} is {problem!r:.80}, not "
                             "a problem text. Fix: pick the column with the problem statements, or clean the data.")
    for i, answer in enumerate(references):
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise ValueError(f"--answer_column {args.answer_column!r}: row {i} of {name} has no answer ({answer!r}). "
                             "Fix: pick the column with the reference answers, or drop the rows without one.")
        if not isinstance(answer, (str, Real)):  # a list or dict would be compared as its repr and score 0
            raise ValueError(f"--answer_column {args.answer_column!r}: row {i} of {name} is a "
                             f"{type(answer).__name__} ({answer!r:.80}), not one answer; its text would never match "
                             "a correct \\boxed{...}. Fix: pick the column with the reference answers as text or "
                             "numbers, or flatten this one (e.g. keep its first element).")
    return problems, [str(answer) for answer in references], name


def build_prompts(tokenizer, problems: list[str], args: EvalArguments) -> list[str]:
    texts = [args.prompt_template.format(problem=p) for p in problems]
    if args.use_chat_template and getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
    return texts


# --- Generation: a generator is loaded once, then called per batch of prompts with that batch's seed -------------

def transformers_generator(model_path: str, args: EvalArguments):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=args.dtype).to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    greedy = args.temperature == 0  # generate refuses temperature 0 with sampling: decode greedily, once

    def generate(prompts: list[str], seed: int) -> list[list[str]]:
        torch.manual_seed(seed)
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=args.temperature,
                                                             top_p=args.top_p, num_return_sequences=args.k)
        with torch.no_grad():
            out = model.generate(**batch, **sampling, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].size(1):], skip_special_tokens=True)
        if greedy:
            return [[text] * args.k for text in texts]
        return [texts[i:i + args.k] for i in range(0, len(texts), args.k)]

    return generate


def vllm_generator(model_path: str, args: EvalArguments):  # GPU only
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, dtype=args.dtype, seed=args.seed)

    def generate(prompts: list[str], seed: int) -> list[list[str]]:
        params = SamplingParams(n=args.k, temperature=args.temperature, top_p=args.top_p,
                                max_tokens=args.max_new_tokens, seed=seed)
        return [[o.text for o in result.outputs] for result in llm.generate(prompts, params)]

    return generate


# --- eval_samples.jsonl: samples saved as they are produced ----------------------------------------------------

def load_generator(model_path: str, problems: list[str], args: EvalArguments, use_vllm: bool):
    """(generate, prompts). A model that cannot be loaded (a mistyped Hub id, a folder without a model) is a
    ValueError naming --model_name_or_path."""
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoTokenizer

    try:
        prompts = build_prompts(AutoTokenizer.from_pretrained(model_path), problems, args)
        generate = (vllm_generator if use_vllm else transformers_generator)(model_path, args)
    except (OSError, HFValidationError) as error:
        reason = " ".join(str(error).split())  # one line: transformers' message spans several
        with checking_inputs():  # a bad flag, found by loading: one line from fipo-trl, like the other input errors
            raise ValueError(f"--model_name_or_path {model_path!r} could not be loaded: {reason} Fix: check the Hub "
                             "id, or pass a folder holding a saved model (config.json, the weights and the "
                             "tokenizer); offline, only models already in the Hugging Face cache load.") from error
    return generate, prompts


def model_index(model_name: str, dataset_name: str, split: str, metrics: dict[str, float]) -> list[dict]:
    """The model card's ``model-index`` block (Hugging Face Hub format) for these results."""
    return [{"name": model_name, "results": [{
        "task": {"type": "text-generation", "name": "Mathematical reasoning"},
        "dataset": {"name": dataset_name, "type": dataset_name, "split": split},
        "metrics": [{"type": name, "name": name, "value": value} for name, value in metrics.items()],
    }]}]


def markdown_table(model_name: str, dataset_name: str, metrics: dict[str, float]) -> str:
    from fipo_trl.tools.model_card import markdown_text

    names = list(metrics)
    model_name, dataset_name = markdown_text(model_name), markdown_text(dataset_name)  # a "|" cannot split a cell
    return "\n".join([
        "| model | dataset | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
        f"| {model_name} | {dataset_name} | " + " | ".join(f"{100 * metrics[n]:.1f}" for n in names) + " |",
        "", "Scores in %. avg@n: mean accuracy of n samples per problem; pass@k: unbiased estimator; cons@k: majority "
        "vote over k samples (math-verify equivalence).", "",
    ])


def check_not_being_saved(model_name_or_path: str | None) -> None:
    """A checkpoint whose save is in progress (or was cut short) has its save marker beside it: its files may be
    half written, which transformers reports as a raw safetensors header error."""
    if model_name_or_path is None or not Path(model_name_or_path).is_dir():
        return
    marker = saving_marker(Path(model_name_or_path).resolve())
    if marker.exists():
        raise ValueError(f"--model_name_or_path {model_name_or_path!r} is being written: its save-in-progress marker "
                         f"{marker} is there (a training run is saving it, or its save was cut short). Fix: wait for "
                         "the save to finish, or evaluate a complete checkpoint (an earlier checkpoint-<step>).")


def warn_unparseable_references(references: list[str], dataset_name: str, args: EvalArguments) -> None:
    """Name the rows whose reference answer math-verify finds no expression in: every sample of them scores as
    wrong, which would otherwise read as a weak model."""
    from fipo_trl.rewards import MathVerifier

    verifier = MathVerifier(args.timeout_seconds)
    try:
        rows = [i for i, reference in enumerate(references) if not verifier.parses(reference)]
    finally:
        verifier.close()
    if rows:
        shown = ", ".join(f"row {i} ({references[i]!r:.40})" for i in rows[:10]) + (", ..." if len(rows) > 10 else "")
        warnings.warn(f"--answer_column {args.answer_column!r}: {len(rows)} reference answer(s) of {dataset_name} do "
                      f"not parse (math-verify finds no expression in them): {shown}. Every sample of those problems "
                      "scores as wrong. Fix: repair those answers, or drop their rows.", UserWarning, stacklevel=2)


@contextmanager
def keeping_samples_when_the_disk_fills(samples_path: Path, saved_count):
    """A full disk (or quota) while writing: say that the samples written so far are kept and a rerun resumes."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OSError(error.errno, f"{error.strerror} while writing {error.filename or samples_path}. The "
                      f"{saved_count()} problems sampled so far are kept in {samples_path}: free space, then rerun "
                      "the same command, which resumes from them.") from error


def evaluate_math(args: EvalArguments) -> dict:
    from fipo_trl.tools.math_metrics import load_math_metric

    # Everything that can be wrong with the inputs is found here, before the model is loaded.
    with checking_inputs():
        validate(args)
        problems, references, dataset_name = load_problems(args)
        output_dir = Path(args.output_dir)
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"--output_dir {args.output_dir!r} cannot be created ({error}). Fix: pass a writable "
                             "folder.") from error
        samples_path = output_dir / SAMPLES_FILE
        saved = read_saved_samples(samples_path, args, problems, references)
        check_not_being_saved(args.model_name_or_path)
    warn_unparseable_references(references, dataset_name, args)
    use_vllm = args.use_vllm
    if use_vllm is None:
        use_vllm = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()

    missing = [i for i in range(len(problems)) if saved is None or i not in saved]
    if missing:
        if saved:
            print(f"Resuming: {len(problems) - len(missing)} of {len(problems)} problems already sampled in "
                  f"{samples_path}")
        model_path = args.model_name_or_path
        if model_path is None:
            from fipo_trl.tools.tiny import build_tiny_model

            model_path = str(build_tiny_model(output_dir / TINY_MODEL_DIR))
        generate, prompts = load_generator(model_path, problems, args, use_vllm)
        with keeping_samples_when_the_disk_fills(samples_path, lambda: len(saved or ())):
            if saved is None:  # written once the model has loaded: a failed load leaves nothing that blocks a rerun
                samples_path.write_text(json.dumps(sampling_header(args)) + "\n")
                saved = {}
            for start in range(0, len(problems), args.batch_size):
                end = min(start + args.batch_size, len(problems))
                todo = [i for i in range(start, end) if i not in saved]
                if not todo:
                    continue
                # The whole batch with its own seed, so that the samples are those of an uninterrupted run.
                batch = generate(prompts[start:end], seed=args.seed + start)
                append_samples(samples_path, todo, [problems[i] for i in todo], [references[i] for i in todo],
                               [batch[i - start] for i in todo])
                saved.update((i, batch[i - start]) for i in todo)
    completions = [saved[i] for i in range(len(problems))]

    scores = load_math_metric().compute(predictions=completions, references=references,
                                        k=args.pass_k or sorted({1, args.k}), timeout_seconds=args.timeout_seconds)
    counts = scores.pop("correct_counts")
    metrics = {name: float(value) for name, value in scores.items() if "@" in name}
    model_name = TINY_MODEL_DIR if args.model_name_or_path is None else args.model_name_or_path
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
    table = markdown_table(model_name, dataset_name, metrics)
    with keeping_samples_when_the_disk_fills(samples_path, lambda: len(saved)):
        write_atomically(output_dir / "eval_results.json", json.dumps(results, indent=2))
        write_atomically(output_dir / "eval_results.md", table)
    print(table)
    print(f"Results written to {output_dir / 'eval_results.json'} and {output_dir / 'eval_results.md'} "
          f"(samples: {samples_path})")
    return results


def main(argv: list[str] | None = None) -> dict:
    """``fipo-trl eval``. A bad argument raises ValueError (message: the flag and the fix) before the model loads;
    the console script prints it and exits with status 2."""
    from trl import TrlParser

    with checking_inputs():
        check_config_file(argv)  # missing, unparsable or with a key twice: one clear line, before TRL reads it
        (args,) = TrlParser((EvalArguments,), prog="fipo-trl eval").parse_args_and_config(argv)
    return evaluate_math(args)
