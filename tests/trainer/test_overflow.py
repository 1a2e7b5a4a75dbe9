"""No NaN step: the trainer's loss follows the official +-20 clamp of the log-ratio (values and gradients), for the
PPO ratio and for the KL term, whatever the log-ratio at response and padding positions."""

import math

import pytest
import torch
from trl import GRPOTrainer

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.kernels.naive import fipo_loss_naive
from fipo_trl.tools.tiny import digit_reward, tiny_prompt_dataset

B, PROMPT, T = 4, 3, 6
DELTAS = [25.0, -25.0, 100.0, -100.0, 1000.0, -1000.0]


def make_trainer(model_path, tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=T, report_to="none", bf16=False, gradient_checkpointing=False, seed=0,
                  fipo_updates_per_generation=2, disable_tqdm=True)
    kwargs.update(overrides)
    trainer = FIPOTrainer(model=model_path, reward_funcs=digit_reward, args=FIPOConfig(**kwargs),
                          train_dataset=tiny_prompt_dataset(8))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # one micro-batch is one optimizer window here
    return trainer


def micro_batch(trainer, deltas: torch.Tensor, advantages: torch.Tensor, ref_deltas: torch.Tensor | None = None):
    """A micro-batch whose pi_old differs from the model's own log-probs by ``deltas`` (B, T); the last completion
    token of rows 0 and 2 is padding, so deltas there hit masked positions."""
    generator = torch.Generator().manual_seed(0)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(10, vocab, (B, PROMPT), generator=generator)
    completion_ids = torch.randint(10, vocab, (B, T), generator=generator)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[[0, 2], -1] = 0
    with torch.no_grad():
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([torch.ones(B, PROMPT, dtype=torch.long), completion_mask], 1), T)
    batch = dict(prompt_ids=prompt_ids, prompt_mask=torch.ones(B, PROMPT, dtype=torch.long),
                 completion_ids=completion_ids, completion_mask=completion_mask, advantages=advantages,
                 old_per_token_logps=logps - deltas, num_items_in_batch=completion_mask.sum())
    if ref_deltas is not None:
        batch["ref_per_token_logps"] = logps + ref_deltas
    return batch, logps


def loss_and_logp_grad(trainer, batch, monkeypatch):
    """TRL's loss through the FIPO hook, the gradient w.r.t. the policy log-probs TRL received, every parameter
    gradient."""
    seen = []
    original = GRPOTrainer._get_per_token_logps_and_entropies

    def spy(self, model, *args, **kwargs):
        logps, entropies, aux = original(self, model, *args, **kwargs)
        logps.retain_grad()
        seen.append(logps)
        return logps, entropies, aux

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", spy)
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    return loss, seen[0].grad, [p.grad for p in trainer.model.parameters() if p.grad is not None]


@pytest.fixture(scope="module")
def trainer(tiny_model_path, tmp_path_factory):
    return make_trainer(tiny_model_path, tmp_path_factory.mktemp("overflow"))


@pytest.mark.parametrize("delta", DELTAS)
@pytest.mark.parametrize("where", ["response", "padding"])
def test_huge_log_ratio_gives_the_official_loss_and_gradient(trainer, monkeypatch, delta, where):
    deltas = torch.zeros(B, T)
    if where == "response":
        deltas[0, 1] = deltas[1, 3] = deltas[3, 0] = delta  # rows with A > 0 and A < 0
        deltas[1, 4] = 0.3  # an ordinary log-ratio next to it
    else:
        deltas[0, -1] = deltas[2, -1] = delta  # masked positions only
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    batch, logps = micro_batch(trainer, deltas, advantages)
    loss, logp_grad, grads = loss_and_logp_grad(trainer, batch, monkeypatch)

    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads) and any((g != 0).any() for g in grads)
    official = fipo_loss_naive(logps, batch["old_per_token_logps"], advantages, batch["completion_mask"])
    # float32 vs float64: exp(20) ~ 4.9e8 enters only through the capped (dual-clip 10 / clip 1.28) surrogate, so
    # the loss and gradient are O(10) and float32 rounding (~1e-7 relative, a few ops) bounds the error well below
    # 1e-5.
    assert loss.item() == pytest.approx(official["loss"].item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(logp_grad.double(), official["grad_logp"], rtol=1e-5, atol=1e-6)
    beyond = (deltas.abs() > 20) & batch["completion_mask"].bool()
    assert (logp_grad[beyond] == 0).all()  # no gradient beyond +-20, as the official clamp


def test_without_the_clamp_trl_would_step_to_nan(trainer, monkeypatch):
    """The failure this guards against, shown on TRL's own loss: a log-ratio of 100 on one response token."""
    deltas = torch.zeros(B, T)
    deltas[0, 1] = 100.0
    batch, _ = micro_batch(trainer, deltas, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    trainer.model.zero_grad()
    loss = GRPOTrainer._compute_loss(trainer, trainer.model, batch)
    loss.backward()
    assert math.isfinite(loss.item())  # the loss looks fine: the clipped branch wins the min...
    assert any(p.grad.isnan().any() for p in trainer.model.parameters() if p.grad is not None)  # ...0 * inf = NaN


@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("delta", DELTAS)
def test_kl_term_is_clamped_too(tiny_model_path, tmp_path, monkeypatch, delta, bias_correction):
    trainer = make_trainer(tiny_model_path, tmp_path, beta=0.1, use_bias_correction_kl=bias_correction)
    ref_deltas = torch.zeros(B, T)
    ref_deltas[1, 2] = delta  # response
    ref_deltas[2, -1] = delta  # padding
    ref_deltas[3, 1] = 0.5  # ordinary
    advantages = torch.zeros(B)  # the loss is the KL term alone
    batch, logps = micro_batch(trainer, torch.zeros(B, T), advantages, ref_deltas=ref_deltas)
    loss, logp_grad, grads = loss_and_logp_grad(trainer, batch, monkeypatch)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    # Expected: beta * token mean of k3(x) = exp(x) - x - 1 with x = clamp(ref - logp, +-20) (verl's low_var_kl
    # clamp); its gradient w.r.t. logp is beta * (1 - exp(x)) / n inside the clamp and 0 beyond. TRL's bias
    # correction multiplies k3 by the PPO ratio r (here 1, pi_old = pi), which adds beta * k3(x) * r / n.
    mask = batch["completion_mask"].double()
    x = ref_deltas.double().clamp(-20, 20) * mask
    n = mask.sum()
    k3 = x.exp() - x - 1
    expected_loss = 0.1 * (k3 * mask).sum() / n
    expected_grad = 0.1 * (1 - x.exp()) * mask * (ref_deltas.abs() <= 20) / n
    if bias_correction:
        expected_grad = expected_grad + 0.1 * k3 * mask / n
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    # rtol: float32 exp and sums of up to 24 terms, ~1e-6 relative; atol covers exact zeros vs rounding
    torch.testing.assert_close(logp_grad.double(), expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("advantages, error", [
    ([3e38, -3e38, 1.0, -1.0], FloatingPointError),  # A * f itself overflows float32: the trainer's check
    ([2e37] * 4, FloatingPointError),  # each token is finite, TRL's float32 token sum is not: the trainer's check
])
def test_overflowing_advantages_stop_before_the_step(trainer, advantages, error):
    batch, _ = micro_batch(trainer, torch.full((B, T), 0.1), torch.tensor(advantages))
    with pytest.raises(error, match="advantages.* too large.*[Ss]cale the rewards down"):
        trainer._compute_loss(trainer.model, batch)
