"""The long-reasoning study: its task, its statistics and a --quick run of the whole pipeline."""

import json
import math
import os
import random
import statistics
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))  # the study's modules live beside its script

import reasoning_task as task  # noqa: E402
import seed_statistics  # noqa: E402


def test_chains_answers_and_rewards():
    operands = [6, 0, 4, 8]
    assert task.prompt_text(operands) == "sum one 6 two 0 three 4 four 8 ?"
    assert task.answer_digit(operands) == "8"
    chain = task.target_text(operands, 4)
    assert chain == "one 6 = 6 , two 0 = 6 , three 4 = 0 , four 8 = 8 , the answer is 8 ."
    assert task.target_text(operands, 0) == "the answer is 8 ."
    assert task.reasoning_steps(chain) == 4 and task.is_stepwise(chain, operands)
    partial = task.target_text(operands, 2)
    assert task.reasoning_steps(partial) == 2 and not task.is_stepwise(partial, operands)
    assert task.parse_answer(chain) == "8" and task.parse_answer(chain[:-2]) is None  # cut off: no answer
    # steps count only from the start, in order, one after the other
    assert task.reasoning_steps("the = 2 , two 2 = 2 , three 2 = 2 , the answer is 2 .") == 0
    assert task.reasoning_steps("one 6 = 6 , three 0 = 6 , the answer is 6 .") == 1
    assert not task.is_stepwise(chain[:-2], operands)  # a full chain without its final answer is not one
    completions, answers = [chain, "the answer is 3 .", partial], ["8", "8", "8"]
    assert task.correctness_reward(completions, answers) == [1.0, -1.0, 1.0]
    assert task.accuracy(completions, answers) == [1.0, 0.0, 1.0]
    assert task.stepwise_share(completions, [operands] * 3) == [1.0, 0.0, 0.0]
    # every target the warm start can produce parses back to the right answer
    rng = random.Random(0)
    for _ in range(200):
        ops = task.draw_operands(rng)
        assert task.MIN_OPERANDS <= len(ops) <= task.MAX_OPERANDS
        for steps in range(len(ops) + 1):
            assert task.parse_answer(task.target_text(ops, steps)) == task.answer_digit(ops)


def test_welch_t_test_matches_the_textbook_formula():
    from scipy import stats

    a, b = [0.61, 0.55, 0.70, 0.58, 0.66], [0.52, 0.49, 0.60, 0.47]
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.mean(a) - statistics.mean(b)) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    got_t, got_p = seed_statistics.welch_t_test(a, b)
    assert got_t == pytest.approx(t, rel=1e-12)
    assert got_p == pytest.approx(2 * stats.t.sf(abs(t), dof), rel=1e-9)
    assert all(math.isnan(v) for v in seed_statistics.welch_t_test([1.0, 1.0], [1.0, 1.0]))  # no spread: undefined


def test_bootstrap_ci_covers_the_difference_and_shrinks_with_separation():
    a, b = [0.61, 0.55, 0.70, 0.58, 0.66], [0.52, 0.49, 0.60, 0.47, 0.55]
    low, high = seed_statistics.bootstrap_ci(a, b)
    assert low < statistics.mean(a) - statistics.mean(b) < high
    assert low > 0  # these arms are separated by more than their spread
    low, high = seed_statistics.bootstrap_ci([0.5, 0.6, 0.4], [0.6, 0.4, 0.5])
    assert low < 0 < high  # same values: the interval straddles 0
    assert seed_statistics.bootstrap_ci([1.0, 1.0], [0.25, 0.25]) == (0.75, 0.75)
    row = seed_statistics.significance_row("accuracy", a, b, percent=True)
    assert row.startswith("| accuracy | +9.4 pt | [+") and row.endswith("| yes |")


def test_future_kl_by_position_averages_each_position_per_half():
    study = pytest.importorskip("long_reasoning_study")
    trainer = types.SimpleNamespace(fipo_last_batch=None)
    by_position = study.FutureKLByPosition(trainer, max_steps=4, length=3)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    for step, scale in ((1, 1.0), (2, 3.0), (3, 10.0)):
        future_kl = scale * torch.tensor([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]])  # 99: padding
        trainer.fipo_last_batch = {"mask": mask, "future_kl": future_kl, "weights": torch.full((2, 3), scale)}
        by_position.callback.on_step_end(None, types.SimpleNamespace(global_step=step), None)
    means = by_position.means()
    first, second = means["first half"], means["second half"]
    assert first["F"] == [4.0, 4.0, None]  # steps 1-2 (scales 1 and 3): (1 + 3 + 3 + 9) / 4 and (2 + 6) / 2
    assert first["f"] == [2.0, 2.0, None] and first["tokens"] == [4.0, 2.0, 0.0]
    assert second["F"] == [20.0, 20.0, None] and second["tokens"] == [2.0, 1.0, 0.0]  # padding never counted


@pytest.mark.slow
def test_quick_mode_runs_the_whole_pipeline(tmp_path):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    from influence_page import read_influence_html

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO / "examples" / "long_reasoning_study.py"), "--quick",
                             "--output_dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("curves.png", "future_kl_by_position.png"):
        image = matplotlib_image.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
    table = (tmp_path / "study.md").read_text()
    assert "| measure | grpo (2 seeds) | dapo (2 seeds) | fipo (2 seeds) |" in table
    assert "fipo − dapo, per seed, all seeds" in table and "p (Wilcoxon)" in table and "Welch" not in table
    data = json.loads((tmp_path / "study.json").read_text())
    assert sorted((run["variant"], run["seed"]) for run in data["runs"]) == sorted(
        (variant, seed) for variant in ("grpo", "dapo", "fipo") for seed in (0, 1))
    for run in data["runs"]:
        assert 0 <= run["held_out"]["accuracy"] <= 1 and run["log_history"]
        assert (run["future_kl_by_position"] is not None) == (run["variant"] == "fipo")
    pages = list((tmp_path / "influence").glob("step-*.html"))
    assert len(pages) == 1  # the first seed's FIPO run, at its last update
    page = pages[0].read_text()
    assert read_influence_html(page) and "prompt</span>sum one" in page and "reference <b>" in page
    assert "reward " in page and 'class="swatch"' in page
    # every run was kept in its own file as it ended: the same command again trains nothing and reports the same runs
    kept = sorted(path.name for path in (tmp_path / "runs").iterdir())
    assert kept == sorted([f"{v}-seed{s}.json" for v in ("grpo", "dapo", "fipo") for s in (0, 1)]
                          + ["before-seed0.json", "before-seed1.json"])
    (tmp_path / "study.md").unlink()
    again = subprocess.run([sys.executable, str(REPO / "examples" / "long_reasoning_study.py"), "--quick",
                            "--output_dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and " s, held-out accuracy" not in again.stdout  # no run trained again
    assert (tmp_path / "study.md").read_text().split("Wall time")[0] == table.split("Wall time")[0]
    # a study in progress is read from the runs it has finished so far
    (tmp_path / "runs" / "fipo-seed1.json").unlink()
    interim = subprocess.run([sys.executable, str(REPO / "examples" / "long_reasoning_study.py"), "--quick",
                              "--interim", "--output_dir", str(tmp_path)], env=env, capture_output=True, text=True,
                             timeout=300)
    assert interim.returncode == 0, interim.stderr[-3000:]
    report = (tmp_path / "study.md").read_text()
    assert "| fipo (1 seeds) |" in report and "| dapo (2 seeds) |" in report and "Interim report" in report
    assert "| held-out accuracy after RL (avg@4) | " in report.split("fipo − dapo")[1]


@pytest.mark.slow
def test_fipo_activity_quick_run_writes_its_table(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "examples" / "fipo_activity.py"), "--quick", "--models",
                             "toy", "--output_dir", str(tmp_path), "--workdir", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "activity.json").read_text())
    assert [r["name"] for r in data] == ["toy, 2 updates"] and len(data[0]["per_update"]) == data[0]["steps"] == 16
    assert "| toy, 2 updates | 16 |" in (tmp_path / "activity.md").read_text()


def test_activity_figures_count_response_tokens_only():
    activity = pytest.importorskip("fipo_activity")
    weights = torch.tensor([[1.0, 1.2, 1.03, 1.005], [1.2, 1.2, 1.2, 1.2]])
    mask = torch.tensor([[True, True, True, True], [False, False, False, False]])
    figures = activity.updates_figures(weights, mask, cap=1.2)
    assert figures == pytest.approx({"tokens": 4.0, "f_mean": (1 + 1.2 + 1.03 + 1.005) / 4, "at_cap": 0.25,
                                     "changed_1pct": 0.5, "changed_5pct": 0.25})


def test_an_initialisation_that_misses_the_warm_start_target_is_replaced(monkeypatch, tmp_path):
    calls = []

    def fake_warm_start(base, output_dir, *, max_steps, seed, **target):
        calls.append(seed)
        return Path(output_dir), max_steps if seed < 2000 else 750, seed >= 2000  # the third init reaches it

    monkeypatch.setattr(task, "warm_start", fake_warm_start)
    path, info = task.prepare_model(tmp_path, seed=7, max_warm_start_steps=100)
    assert calls == [7, 1007, 2007] and path == tmp_path / "warm-start-2"
    assert info == {"init_seed": 2007, "steps": 750, "reached": True}
    calls.clear()
    monkeypatch.setattr(task, "warm_start", lambda *a, seed, **k: (calls.append(seed), Path("w"), 100, False)[1:])
    _, info = task.prepare_model(tmp_path, seed=7, attempts=2)
    assert calls == [7, 1007] and info == {"init_seed": 1007, "steps": 100, "reached": False}  # kept, and reported


def test_paired_t_test_matches_the_textbook_sleep_data_and_scipy():
    from scipy import stats

    # Student's sleep data (Cushny & Peebles): extra hours of sleep under two drugs for the same 10 patients. The
    # textbook paired t-test gives t = 4.0621 on 9 degrees of freedom, two-sided p = 0.002833.
    drug_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    drug_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    differences = [a - b for a, b in zip(drug_2, drug_1)]
    t, p = seed_statistics.paired_t_test(differences)
    assert t == pytest.approx(4.0621, abs=5e-5) and p == pytest.approx(0.002833, abs=5e-7)
    reference = stats.ttest_rel(drug_2, drug_1)
    assert t == pytest.approx(reference.statistic, rel=1e-12) and p == pytest.approx(reference.pvalue, rel=1e-9)
    assert seed_statistics.paired_t_test([0.5, 0.5, 0.5]) == pytest.approx((math.nan,) * 2, nan_ok=True)


def test_wilcoxon_matches_exact_counts_worked_by_hand():
    # n = 5 differences, all positive: W- = 0; of the 2^5 equally likely sign patterns only "all +" and "all -" are
    # as extreme, so p = 2/32.
    assert seed_statistics.wilcoxon_p([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 32)
    # n = 6, ranks 1..6, the rank-2 difference negative: W- = 2; sign patterns with a negative rank sum <= 2 are {},
    # {1}, {2}: p = 2 x 3/64.
    assert seed_statistics.wilcoxon_p([1, -2, 3, 4, 5, 6]) == pytest.approx(6 / 64)
    assert math.isnan(seed_statistics.wilcoxon_p([0.0, 0.0]))


def test_paired_bootstrap_resamples_seeds_and_rows_pair_by_seed():
    differences = [1.0, 2.0, 3.0, 4.0]
    low, high = seed_statistics.paired_bootstrap_ci(differences)
    assert 1.0 <= low < 2.5 < high <= 4.0
    assert seed_statistics.paired_bootstrap_ci([2.0] * 6) == (2.0, 2.0)  # no spread between seeds: no width
    # rows pair values by seed, skip seeds either arm lacks or left undefined, and count who is ahead
    a = {0: 0.9, 1: 0.8, 2: 0.7, 3: float("nan"), 4: 0.6}
    b = {0: 0.8, 1: 0.85, 2: 0.6, 3: 0.5}
    row = seed_statistics.paired_significance_row("accuracy", a, b, percent=True).split(" | ")
    assert row[1] == f"{100 * statistics.mean([0.1, -0.05, 0.1]):+.1f} pt" and row[2] == "3" and row[7] == "2/3"
    t, p = seed_statistics.paired_t_test([0.9 - 0.8, 0.8 - 0.85, 0.7 - 0.6])
    assert row[4] == f"{t:.2f}" and row[5] == f"{p:.3f}"
