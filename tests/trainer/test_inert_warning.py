"""The trainer says when FIPO has become DAPO in effect: fipo/weight_changed_ratio and the inert warning."""

import warnings

import pytest
import torch

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.inert_watch import InertFIPOWatch
from fipo_trl.kernels.common import WEIGHT_CHANGED_TOLERANCE
from fipo_trl.tools.tiny import digit_reward, tiny_prompt_dataset

INERT = "FIPO is close to inert"


def run(tiny_model_path, tmp_path, **overrides):
    """4 optimizer steps, 2 per generation batch: one default window (2 generation batches) of 4 micro-batches."""
    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=8, max_steps=4, learning_rate=1e-2, report_to="none", logging_steps=1,
                  save_strategy="no", bf16=False, seed=0, fipo_updates_per_generation=2, disable_tqdm=True)
    kwargs.update(overrides)
    trainer = FIPOTrainer(model=tiny_model_path, reward_funcs=digit_reward, args=FIPOConfig(**kwargs),
                          train_dataset=tiny_prompt_dataset(16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    inert = [str(w.message) for w in caught if INERT in str(w.message)]
    return trainer, inert


def changed_share(weights, mask):
    return (((weights.double() - 1).abs() > WEIGHT_CHANGED_TOLERANCE) & mask).sum().item() / mask.sum().item()


def test_an_inert_run_is_named_once_with_its_figures_and_the_fixes(tiny_model_path, tmp_path):
    # a learning rate so small that pi_theta never leaves pi_old: every f is 1, FIPO is DAPO
    trainer, inert = run(tiny_model_path, tmp_path, learning_rate=1e-9)
    assert len(inert) == 1, inert
    message = inert[0]
    assert "0.0% of response tokens" in message and "f mean 1.0000" in message
    for fix in ("fipo_updates_per_generation", "(now 2;", "learning_rate (now 1e-09)", "fipo_decay_rate (now 32)",
                "dynamic_sampling", "fipo_inert_threshold=0"):
        assert fix in message, fix
    ratios = [h["fipo/weight_changed_ratio"] for h in trainer.state.log_history if "fipo/weight_changed_ratio" in h]
    assert len(ratios) == 4 and max(ratios) == 0.0


def test_an_active_run_stays_silent_and_logs_the_share_its_weights_show(tiny_model_path, tmp_path, monkeypatch):
    shares = []
    original = FIPOTrainer._apply_fipo_weights

    def record(trainer, batch, logps):
        original(trainer, batch, logps)
        shares.append(changed_share(trainer.fipo_last_batch["weights"], trainer.fipo_last_batch["mask"]))

    monkeypatch.setattr(FIPOTrainer, "_apply_fipo_weights", record)
    trainer, inert = run(tiny_model_path, tmp_path)
    logged = [h["fipo/weight_changed_ratio"] for h in trainer.state.log_history if "fipo/weight_changed_ratio" in h]
    # one micro-batch per optimizer step: the logged share is that micro-batch's, from the kernel's own count
    assert logged == pytest.approx(shares, abs=1e-6)
    assert shares[0] == 0.0 and shares[1] > 0.05  # the first update of a generation batch has f = 1 everywhere
    assert sum(shares) / len(shares) >= 0.05 and inert == []


def test_the_check_can_be_turned_off(tiny_model_path, tmp_path):
    trainer, inert = run(tiny_model_path, tmp_path, learning_rate=1e-9, fipo_inert_threshold=0)
    assert inert == [] and trainer._fipo_inert_watch is None


def test_the_watch_pools_a_window_and_is_rate_limited():
    def stats(changed, tokens=100.0):
        return {"n_weight_changed": changed, "n_tokens": tokens, "sum_weight": tokens, "n_upper_clipped": 0.0}

    # pooled over the window: 0 + 0 + 0 + 16 changed of 400 tokens = 4 % < 5 %: inert, reported at the 4th
    watch = InertFIPOWatch(threshold=0.05, micro_batches_per_window=4)
    results = [watch.add(stats(c)) for c in (0, 0, 0, 16)]
    assert results[:3] == [None] * 3 and results[3]["changed"] == pytest.approx(0.04)
    # 20 of 400 = 5 %: not below the threshold, never reported
    active = InertFIPOWatch(threshold=0.05, micro_batches_per_window=4)
    assert all(active.add(stats(c)) is None for c in (0, 20, 0, 0) * 5)
    # an inert run warns at its 1st window, then stays silent for QUIET_WINDOWS windows, then warns again
    warned = [i for i in range(30) if [watch.add(stats(0)) for _ in range(4)][-1] is not None]
    assert warned == [InertFIPOWatch.QUIET_WINDOWS, 2 * InertFIPOWatch.QUIET_WINDOWS + 1]


@pytest.mark.parametrize("field, value", [("fipo_inert_threshold", -0.1), ("fipo_inert_threshold", 1.5),
                                          ("fipo_inert_threshold", float("nan")), ("fipo_inert_window", 0),
                                          ("fipo_inert_window", 1.5)])
def test_bad_thresholds_are_refused_by_name(field, value, tmp_path):
    with pytest.raises(ValueError, match=f"`{field}`"):
        FIPOConfig(output_dir=str(tmp_path), **{field: value})


def test_changed_share_helper_counts_both_sides():
    weights = torch.tensor([[1.0, 1.02, 0.98, 1.005]])
    assert changed_share(weights, torch.ones_like(weights, dtype=torch.bool)) == 0.5
