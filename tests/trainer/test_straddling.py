"""Optimizer steps that straddle generation batches, as in TRL's own test_prepare_input_called_with_correct_data
(steps_per_generation 4 x num_iterations 2 micro-steps per generation batch, gradient_accumulation_steps 3): accepted
as GRPOConfig accepts them, warned with the fractional updates per generation batch, written on the model card, and
FIPO's weights exact on every micro-batch, each against the pi_old of its own generation batch."""

import pytest
import torch
from trl import GRPOTrainer

import fipo_trl.trainer
from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.kernels.naive import fipo_loss_naive
from fipo_trl.tools.tiny import digit_reward, tiny_prompt_dataset

STRADDLING = dict(steps_per_generation=4, num_iterations=2, gradient_accumulation_steps=3)


def config(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                  learning_rate=1e-2, report_to="none", logging_steps=1, save_strategy="no", bf16=False, seed=0,
                  disable_tqdm=True, **STRADDLING)
    kwargs.update(overrides)
    return FIPOConfig(**kwargs)


@pytest.mark.parametrize("steps_per_generation, num_iterations, grad_accum, updates, straddles", [
    (4, 2, 3, 8 / 3, True),  # TRL's test: an optimizer step takes micro-batches of two generation batches
    (3, 1, 2, 1.5, True),
    (2, 1, 3, 2 / 3, True),  # fewer micro-steps than one optimizer step, yet not a divisor of it
    (8, 1, 2, 4.0, False),
    (1, 1, 4, 0.25, False),  # several whole generation batches per update (degenerate; warned at trainer init)
])
def test_straddling_configs_are_accepted_with_their_updates_per_generation_batch(
        tmp_path, steps_per_generation, num_iterations, grad_accum, updates, straddles):
    args = config(tmp_path, steps_per_generation=steps_per_generation, num_iterations=num_iterations,
                  gradient_accumulation_steps=grad_accum)
    assert args.fipo_updates_per_generation_batch == pytest.approx(updates)
    assert args.fipo_straddles_generation_batches is straddles


def test_a_straddling_run_trains_with_exact_weights_on_each_micro_batchs_own_pi_old(tiny_model_path, tmp_path,
                                                                                    monkeypatch):
    generations, micro_batches = [], []
    generate = GRPOTrainer._generate_and_score_completions

    def record_generation(trainer, inputs):
        output = generate(trainer, inputs)
        generations.append(output["old_per_token_logps"].clone())  # pi_old of this generation batch, per row
        return output

    weights = fipo_trl.trainer.fipo_weights

    def record_weights(logps, old, advantages, mask, **hyperparameters):
        out = weights(logps, old, advantages, mask, **hyperparameters)
        micro_batches.append(dict(logps=logps.clone(), old=old.clone(), advantages=advantages.clone(), mask=mask,
                                  hyperparameters=hyperparameters, out=out))
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", record_generation)
    monkeypatch.setattr(fipo_trl.trainer, "fipo_weights", record_weights)
    args = config(tmp_path, max_steps=3)  # 9 micro-steps: step 3 takes micro-steps 6, 7 (batch 0) and 8 (batch 1)
    with pytest.warns(UserWarning, match=r"straddle generation batches: steps_per_generation \(4\) x num_iterations "
                                         r"\(2\) .* gradient_accumulation_steps \(3\), so each generation batch gets "
                                         r"2\.67 optimizer updates"):
        trainer = FIPOTrainer(model=tiny_model_path, reward_funcs=digit_reward, args=args,
                              train_dataset=tiny_prompt_dataset(16))
    trainer.train()

    assert trainer.state.global_step == 3 and len(generations) == 2 and len(micro_batches) == 9
    for micro_step, batch in enumerate(micro_batches):
        own_pi_old = generations[micro_step // 8]  # 8 micro-steps per generation batch
        # the micro-batch's pi_old rows are rows of its own generation batch's pi_old, not the other one's
        for row in batch["old"]:
            assert any(torch.equal(row, candidate.float()) for candidate in own_pi_old), micro_step
        official = fipo_loss_naive(batch["logps"], batch["old"], batch["advantages"], batch["mask"],
                                   **batch["hyperparameters"])
        on = batch["mask"]
        torch.testing.assert_close(batch["out"].weights[on].double(), official["w"][on], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(batch["out"].keep.double(), official["seq_valid"], rtol=0, atol=0)
    # the straddling step's last micro-batch is the first of batch 1: pi_theta == its own pi_old there (F = 0,
    # f = 1), although pi_theta has moved away from batch 0's pi_old used one micro-step before
    last = micro_batches[8]
    assert torch.equal(last["out"].weights[last["mask"]], torch.ones_like(last["out"].weights[last["mask"]]))
    assert any((micro_batches[step]["out"].weights[micro_batches[step]["mask"]] != 1).any() for step in (6, 7))

    card = (tmp_path / "README.md")
    trainer.create_model_card()
    assert "2.67: optimizer steps straddled generation batches (steps_per_generation 4 × num_iterations 2 over " \
           "gradient_accumulation_steps 3); each micro-batch's weights used its own π_old" in card.read_text()
