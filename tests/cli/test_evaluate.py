"""The math_metrics evaluate metric (hand-computed avg@k / pass@k / cons@k) and the evaluation script end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest

from fipo_trl.tools.math_metrics import METRIC_PATH, load_math_metric
from fipo_trl.tools.math_metrics.math_metrics import majority_vote, pass_at_k

REPO = Path(__file__).resolve().parents[2]


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    assert pass_at_k(4, 3, 2) == 1.0 and pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(16, 4, 8) == pytest.approx(1 - 495 / 12870)  # C(12,8)/C(16,8)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_vote_ties_and_missing_answers():
    same = lambda a, b: a == b  # noqa: E731
    assert majority_vote(["1", "2", "2", None], [True, False, False, False], same) is False
    assert majority_vote(["1", "2"], [True, False], same) is True  # tie: the group seen first
    assert majority_vote([None, None], [False, False], same) is False


def test_metric_loads_through_evaluate_and_matches_hand_values():
    metric = evaluate.load(METRIC_PATH)  # a local path: works offline
    predictions = [
        ["\\boxed{4}", "\\boxed{5}", "\\boxed{5}", "no answer"],  # 1 of 4 correct; majority 5 (wrong)
        ["\\boxed{1/2}", "\\boxed{0.5}", "\\boxed{3}", "Answer: 3"],  # 2 of 4; 1/2 ~ 0.5 tie 3 vs 3: first group wins
        ["\\boxed{7}"] * 4,  # 0 of 4
    ]
    references = ["4", "\\frac{1}{2}", "8"]
    scores = metric.compute(predictions=predictions, references=references, k=[1, 2, 4])
    assert scores["avg@4"] == pytest.approx(3 / 12)
    assert scores["pass@1"] == pytest.approx((1 / 4 + 2 / 4 + 0) / 3)
    assert scores["pass@2"] == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6) + 0) / 3)
    assert scores["pass@4"] == pytest.approx(2 / 3)
    assert scores["cons@1"] == pytest.approx(2 / 3)  # first samples: 4 (right), 1/2 (right), 7 (wrong)
    assert scores["cons@2"] == pytest.approx(2 / 3)  # {4},{5} tie -> 4; {1/2, 0.5}; {7}
    assert scores["cons@4"] == pytest.approx(1 / 3)  # 5 wins; {1/2,0.5} ties {3,3} -> first; 7
    assert scores["correct_counts"] == [1, 2, 0] and scores["num_samples"] == 4


def test_evaluate_script_end_to_end_on_the_tiny_model(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO / "examples" / "evaluate_math.py"), "--output_dir",
                             str(tmp_path / "eval"), "--k", "4", "--pass_k", "1", "2", "4", "--max_new_tokens", "6"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert set(results["metrics"]) == {"avg@4", "pass@1", "pass@2", "pass@4", "cons@1", "cons@2", "cons@4"}
    assert results["num_problems"] == 4 and all(len(s["completions"]) == 4 for s in results["samples"])
    assert results["generation"]["backend"] == "transformers"
    samples = [json.loads(line) for line in (tmp_path / "eval" / "eval_samples.jsonl").read_text().splitlines()]
    assert samples[0]["eval_samples_header"]["k"] == 4 and len(samples) == 1 + 4  # header + one line per problem
    assert [s["completions"] for s in samples[1:]] == [s["completions"] for s in results["samples"]]
    assert "| avg@4 |" in (tmp_path / "eval" / "eval_results.md").read_text()
    # The model-index block is what the Hub expects in a model card.
    from huggingface_hub.repocard_data import model_index_to_eval_results

    name, eval_results = model_index_to_eval_results(results["model-index"])
    assert {r.metric_type for r in eval_results} == set(results["metrics"])
    assert results["eval_results"] == {results["dataset"]: results["metrics"]}


def test_eval_subcommand_on_a_local_dataset_file(tmp_path):
    from fipo_trl.tools import cli

    data = tmp_path / "aime.jsonl"
    data.write_text("".join(json.dumps({"problem": f"what is {w} plus one ?", "answer": a}) + "\n"
                            for w, a in [("one", "2"), ("two", "3")]))
    cli.main(["eval", "--dataset_name", str(data), "--k", "2", "--max_new_tokens", "4",
              "--output_dir", str(tmp_path / "e")])  # the console script returns None: read what it wrote
    results = json.loads((tmp_path / "e" / "eval_results.json").read_text())
    assert results["num_problems"] == 2 and set(results["metrics"]) == {"avg@2", "pass@1", "pass@2", "cons@1",
                                                                        "cons@2"}
    assert load_math_metric().name == "math_metrics"


def test_evaluate_script_refuses_bad_flags_with_status_2_before_loading_anything(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "examples" / "evaluate_math.py"), "--k", "2", "--pass_k", "5",
                             "--output_dir", str(tmp_path / "eval")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "evaluate_math.py: error: --pass_k [5]" in result.stderr and "raise --k to 5" in result.stderr
    assert not (tmp_path / "eval").exists()  # the tiny model was not even built
