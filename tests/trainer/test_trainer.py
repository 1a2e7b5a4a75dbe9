"""FIPOTrainer as a drop-in for GRPOTrainer, and the FIPO-specific trainer behaviour."""

import dataclasses
import re
import warnings

import pytest
import torch
from peft import LoraConfig
from trainer_utils import config_kwargs, crafted_micro_batch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

import fipo_trl.trainer
from fipo_trl import FIPOConfig, FIPOTrainer, fipo_loss, fipo_weights
from fipo_trl.kernels import c_kernel_usable
from fipo_trl.safety.versions import trl_older_than
from fipo_trl.tools.tiny import digit_reward, tiny_prompt_dataset

PAIRS = [(GRPOTrainer, GRPOConfig), (FIPOTrainer, FIPOConfig)]
PAIR_IDS = ["grpo", "fipo"]


def train(trainer_cls, config_cls, model, tmp_path, dataset=None, reward_funcs=digit_reward, **overrides):
    trainer_kwargs = {k: overrides.pop(k) for k in ("peft_config", "eval_dataset", "callbacks") if k in overrides}
    args = config_cls(**config_kwargs(tmp_path, **overrides))
    trainer = trainer_cls(model=model, reward_funcs=reward_funcs, args=args,
                          train_dataset=dataset if dataset is not None else tiny_prompt_dataset(16), **trainer_kwargs)
    trainer.train()
    return trainer


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def force_unit_weights(monkeypatch):
    def unit_weights(logps, old, advantages, mask, **kwargs):
        out = fipo_weights(logps, old, advantages, mask, **kwargs)
        unweighted = (advantages[:, None] if advantages.dim() == 1 else advantages) * mask  # A * 1, 0 off the response
        return dataclasses.replace(out, weights=torch.ones_like(out.weights), keep=torch.ones_like(out.keep),
                                   weighted_advantages=unweighted.to(out.weighted_advantages.dtype))

    monkeypatch.setattr(fipo_trl.trainer, "fipo_weights", unit_weights)


# --- parity and activity ---------------------------------------------------------------------------------------


LOSS_SETTINGS = {  # every TRL loss type, and sequence-level importance sampling (GSPO, and LUSPO as its paper)
    "dapo": {}, "bnpo": {}, "grpo": {}, "dr_grpo": {}, "luspo": {"importance_sampling_level": "sequence"},
    "cispo": {"epsilon_high": 5.0}, "sapo": {}, "vespo": {},
    "bnpo_sequence": {"importance_sampling_level": "sequence"},
}


@pytest.mark.parametrize("setting", list(LOSS_SETTINGS))
def test_unit_weights_reproduce_grpo_exactly(setting, tiny_model_path, tmp_path, monkeypatch):
    """With f forced to 1 the hook changes nothing: per-step losses and final parameters equal GRPOTrainer's."""
    if setting == "luspo" and trl_older_than("1.10"):
        pytest.skip("FIPOConfig refuses luspo on TRL < 1.10 (test_versions.py): it averages over padding there")
    options = dict(LOSS_SETTINGS[setting], loss_type=setting.removesuffix("_sequence"))
    sequence_level = options.get("importance_sampling_level") == "sequence"
    if sequence_level:  # see below: plain SGD, so that a rounding difference stays a rounding difference
        options["optim"] = "sgd"
    grpo = train(GRPOTrainer, GRPOConfig, tiny_model_path, tmp_path / "g", **options)
    force_unit_weights(monkeypatch)
    fipo = train(FIPOTrainer, FIPOConfig, tiny_model_path, tmp_path / "f", **options)
    assert len(losses(fipo)) == 4
    # Token level: the same float32 operations, so equal to rounding noise of the last logged digit. Sequence level:
    # TRL multiplies a (B, 1) ratio by (B, 1) advantages but by FIPO's (B, T) ones, so the token sum of the loss is
    # summed in another order: a float32 reordering over T = 8 tokens, a few 1e-7 relative.
    assert losses(fipo) == pytest.approx(losses(grpo), rel=1e-6 if sequence_level else 0, abs=1e-7)
    for (name, p_fipo), (_, p_grpo) in zip(fipo.model.named_parameters(), grpo.model.named_parameters()):
        # (Adam divides by sqrt(v), which turns the sequence level's reordering on a near-zero gradient component
        # into an update difference of up to the learning rate; SGD keeps it at lr x rounding.)
        torch.testing.assert_close(p_fipo, p_grpo, rtol=0, atol=1e-6, msg=name)


class RecordComputeLoss:
    """Spy on GRPOTrainer._compute_loss: the advantages TRL actually used, and the fipo_weights call behind them."""

    def __init__(self, monkeypatch):
        self.calls, self.fipo_calls = [], []
        original_compute, original_fipo = GRPOTrainer._compute_loss, fipo_trl.trainer.fipo_weights

        def compute(trainer, model, inputs):
            loss = original_compute(trainer, model, inputs)
            self.calls.append({"advantages": dict.__getitem__(inputs, "advantages").clone(),
                               "step": trainer.state.global_step})
            return loss

        def recording_fipo(*args, **kwargs):
            self.fipo_calls.append((args, kwargs))
            return original_fipo(*args, **kwargs)

        monkeypatch.setattr(GRPOTrainer, "_compute_loss", compute)
        monkeypatch.setattr(fipo_trl.trainer, "fipo_weights", recording_fipo)


def test_fipo_is_active_after_the_first_update_of_each_generation_batch(tiny_model_path, tmp_path, monkeypatch):
    spy = RecordComputeLoss(monkeypatch)
    trainer = train(FIPOTrainer, FIPOConfig, tiny_model_path, tmp_path, steps_per_generation=4, max_steps=8)
    active = [h["fipo/active"] for h in trainer.state.log_history if "fipo/active" in h]
    future_kl = [h["fipo/future_kl_mean"] for h in trainer.state.log_history if "fipo/future_kl_mean" in h]
    assert len(active) == 8
    for step in range(8):
        if step % 4 == 0:  # first micro-step of a generation batch: pi_theta == pi_old exactly
            assert active[step] == 0 and future_kl[step] == 0
        else:
            assert active[step] > 0.5 and future_kl[step] != 0
    # The advantages TRL trained with are A * f, f from fipo_weights on the very tensors of that micro-step.
    assert len(spy.calls) == len(spy.fipo_calls) == 8
    official = dict(decay_rate=32.0, clip_ratio=0.2, clip_high_only=True, safety_threshold=10.0, delta=10.0,
                    epsilon=0.2, epsilon_high=0.28)
    for call, (args, kwargs) in zip(spy.calls, spy.fipo_calls):
        logps, old, advantages, mask = args
        assert kwargs == official  # the config's fields, under the functional names
        out = fipo_weights(logps, old, advantages, mask, **official)
        torch.testing.assert_close(call["advantages"], out.weighted_advantages, rtol=0, atol=0)
        on_response = (advantages[:, None] * out.weights)[mask]  # A * f on the response, 0 elsewhere
        torch.testing.assert_close(call["advantages"][mask], on_response, rtol=0, atol=0)
        assert (call["advantages"][~mask] == 0).all()
    weights = [fipo_weights(*args, **kwargs).weights for args, kwargs in spy.fipo_calls]
    assert any((w != 1).any() for w in weights)
    # on CPU the trainer uses the fused C kernel (the torch path where no C compiler exists), and says so
    fused = c_kernel_usable()
    assert trainer.fipo_backend == ("c" if fused else "torch")
    assert {h["fipo/fused_kernel"] for h in trainer.state.log_history if "fipo/fused_kernel" in h} == {float(fused)}


def test_fipo_trains_differently_from_grpo(tiny_model_path, tmp_path):
    grpo = train(GRPOTrainer, GRPOConfig, tiny_model_path, tmp_path / "g")
    fipo = train(FIPOTrainer, FIPOConfig, tiny_model_path, tmp_path / "f")
    assert losses(fipo)[0] == pytest.approx(losses(grpo)[0], abs=1e-7)  # on-policy first micro-step: f = 1
    assert losses(fipo)[1] != pytest.approx(losses(grpo)[1], abs=1e-6)


def test_buffered_inputs_are_never_modified(tiny_model_path, tmp_path, monkeypatch):
    """TRL reuses its buffered micro-batch dicts across num_iterations; FIPO works on a private copy."""
    seen = []
    original = GRPOTrainer._prepare_inputs

    def prepare(trainer, generation_batch):
        inputs = original(trainer, generation_batch)
        seen.append((inputs, inputs["advantages"].clone()))
        return inputs

    monkeypatch.setattr(GRPOTrainer, "_prepare_inputs", prepare)
    train(FIPOTrainer, FIPOConfig, tiny_model_path, tmp_path, num_iterations=2, max_steps=4)
    assert seen
    for inputs, advantages in seen:
        assert inputs["advantages"].dim() == 1 and torch.equal(inputs["advantages"], advantages)


# --- the official normalisation and the sequence filter inside the trainer -------------------------------------


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_bnpo_is_the_official_per_micro_batch_loss_with_sequence_filter(grad_accum, tiny_model_path, tmp_path):
    args = FIPOConfig(**config_kwargs(tmp_path, gradient_accumulation_steps=grad_accum,
                                      steps_per_generation=2 * grad_accum))
    trainer = FIPOTrainer(model=tiny_model_path, reward_funcs=digit_reward, args=args,
                          train_dataset=tiny_prompt_dataset(16))
    batch, logps = crafted_micro_batch(trainer, AutoTokenizer.from_pretrained(tiny_model_path))
    snapshot = {k: v.clone() for k, v in batch.items()}
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = grad_accum
    loss = trainer._compute_loss(trainer.model, batch)

    official = fipo_loss(logps, batch["old_per_token_logps"], batch["advantages"], batch["completion_mask"])
    assert official.keep.tolist() == [False, True, True, True]
    assert loss.item() * grad_accum == pytest.approx(official.loss.item(), abs=1e-6)
    assert trainer._metrics["train"]["fipo/dropped_seq_ratio"][-1] == pytest.approx(0.25)
    assert all(torch.equal(batch[k], snapshot[k]) for k in batch)  # the caller's dict is untouched


def test_dapo_keeps_filtered_completions_in_the_denominator(tiny_model_path, tmp_path):
    """Documented deviation for loss types other than bnpo: a filtered completion leaves the numerator only."""
    args = FIPOConfig(**config_kwargs(tmp_path, loss_type="dapo"))
    trainer = FIPOTrainer(model=tiny_model_path, reward_funcs=digit_reward, args=args,
                          train_dataset=tiny_prompt_dataset(16))
    batch, logps = crafted_micro_batch(trainer, AutoTokenizer.from_pretrained(tiny_model_path))
    trainer.model.eval()  # eval: dapo normalises by this micro-batch's own token count
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, batch)
    official = fipo_loss(logps, batch["old_per_token_logps"], batch["advantages"], batch["completion_mask"])
    n_tokens, n_kept = batch["completion_mask"].sum().item(), batch["completion_mask"][1:].sum().item()
    assert loss.item() == pytest.approx(official.loss.item() * n_kept / n_tokens, abs=1e-6)


# --- drop-in: one test body for both trainers ------------------------------------------------------------------


async def async_digit_reward(completions, **kwargs):
    return digit_reward(completions, **kwargs)


def length_reward(completions, **kwargs):
    return [-0.1 * len(c.split()) for c in completions]


class CountingCallback(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


SCENARIOS = {
    "standard": {},
    "conversational": {"dataset": "conversational"},
    "loss_dapo": {"loss_type": "dapo"},
    "loss_grpo": {"loss_type": "grpo"},
    "loss_dr_grpo": {"loss_type": "dr_grpo"},
    "loss_luspo": {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    "loss_cispo": {"loss_type": "cispo", "epsilon_high": 5.0},
    "loss_sapo": {"loss_type": "sapo"},
    "loss_vespo": {"loss_type": "vespo"},
    "sequence_is": {"importance_sampling_level": "sequence"},
    "grad_accum": {"gradient_accumulation_steps": 2, "steps_per_generation": 4, "max_steps": 2},
    "num_iterations": {"num_iterations": 2, "steps_per_generation": 1},
    "eval": {"eval_strategy": "steps", "eval_steps": 2, "per_device_eval_batch_size": 4, "eval_dataset": "eval"},
    "async_reward": {"reward_funcs": [async_digit_reward]},
    "weighted_rewards": {"reward_funcs": [digit_reward, length_reward], "reward_weights": [1.0, 0.5]},
    "beta": {"beta": 0.04},
    "lora": {"peft_config": "lora", "learning_rate": 5e-2},
    "callbacks": {"callbacks": "counting"},
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("trainer_cls, config_cls", PAIRS, ids=PAIR_IDS)
def test_drop_in_training(trainer_cls, config_cls, scenario, tiny_model_path, tmp_path):
    if scenario == "loss_luspo" and config_cls is FIPOConfig and trl_older_than("1.10"):
        pytest.skip("FIPOConfig refuses luspo on TRL < 1.10 (test_versions.py): it averages over padding there")
    options = dict(SCENARIOS[scenario])
    dataset = tiny_prompt_dataset(16, conversational=options.pop("dataset", None) == "conversational")
    if options.get("eval_dataset") == "eval":
        options["eval_dataset"] = tiny_prompt_dataset(8, seed=1)
    if options.get("peft_config") == "lora":
        options["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM")
    callback = CountingCallback()
    if options.get("callbacks") == "counting":
        options["callbacks"] = [callback]
    reward_funcs = options.pop("reward_funcs", digit_reward)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    trainer = train(trainer_cls, config_cls, model, tmp_path, dataset=dataset, reward_funcs=reward_funcs, **options)

    history = trainer.state.log_history
    assert history[-1]["train_loss"] is not None
    trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    if scenario == "lora":
        assert trained and all("lora_" in n for n in trained)
    for name, param in trained.items():
        if name.replace("base_model.model.", "") in before:
            assert not torch.equal(param, before[name.replace("base_model.model.", "")]), f"{name} did not change"
    if scenario == "eval":
        assert any("eval_loss" in h for h in history)
    if scenario == "callbacks":
        assert callback.steps == trainer.state.global_step
    if trainer_cls is FIPOTrainer:
        active = [h["fipo/active"] for h in history if "fipo/active" in h]
        assert active and max(active) > 0  # FIPO weights were live on the off-policy micro-steps
        if scenario == "eval":
            assert any("eval_fipo/influence_weights_mean" in h for h in history)


# --- config, warnings, errors, model card ----------------------------------------------------------------------


def test_default_config_is_not_degenerate(tmp_path):
    args = FIPOConfig(output_dir=str(tmp_path), bf16=False, gradient_accumulation_steps=2)
    assert args.steps_per_generation == 16 and not args.fipo_is_degenerate
    assert (args.fipo_decay_rate, args.fipo_clip_ratio, args.fipo_clip_high_only, args.fipo_safety_threshold) == (
        32.0, 0.2, True, 10.0)
    assert (args.delta, args.epsilon, args.epsilon_high, args.beta, args.loss_type) == (10.0, 0.2, 0.28, 0.0, "bnpo")
    explicit = FIPOConfig(output_dir=str(tmp_path), bf16=False, steps_per_generation=3)
    assert explicit.steps_per_generation == 3  # the user's choice wins


def test_degenerate_config_warns_loudly(tiny_model_path, tmp_path):
    args = FIPOConfig(**config_kwargs(tmp_path, steps_per_generation=1))
    assert args.fipo_is_degenerate
    with pytest.warns(UserWarning, match=r"degenerate.*DAPO.*steps_per_generation"):
        FIPOTrainer(model=tiny_model_path, reward_funcs=digit_reward, args=args, train_dataset=tiny_prompt_dataset(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        args = FIPOConfig(**config_kwargs(tmp_path))
        assert not args.fipo_is_degenerate


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"fipo_decay_rate": 0.0}, "fipo_decay_rate"),
        ({"fipo_decay_rate": float("nan")}, "fipo_decay_rate"),
        ({"fipo_clip_ratio": -0.5}, "fipo_clip_ratio"),
        ({"fipo_clip_ratio": 1.0, "fipo_clip_high_only": False}, "fipo_clip_ratio"),
        ({"fipo_safety_threshold": 0.0}, "fipo_safety_threshold"),
        ({"delta": 1.25}, "delta"),
        ({"delta": None}, "delta"),
        ({"fipo_updates_per_generation": 0}, "fipo_updates_per_generation"),
        ({"loss_type": "ppo"}, "loss_type"),
        ({"importance_sampling_level": "group"}, "importance_sampling_level"),
    ],
)
def test_bad_config_names_the_field_and_the_fix(overrides, field, tmp_path):
    kwargs = config_kwargs(tmp_path, **overrides)
    if "fipo_updates_per_generation" in overrides:
        kwargs.pop("steps_per_generation")
    with pytest.raises(ValueError, match=rf"`{field}` = .*(Use|Set|Fix)"):
        FIPOConfig(**kwargs)


def test_trainer_rejects_a_grpo_config(tiny_model_path, tmp_path):
    with pytest.raises(TypeError, match="FIPOConfig"):
        FIPOTrainer(model=tiny_model_path, reward_funcs=digit_reward, args=GRPOConfig(**config_kwargs(tmp_path)),
                    train_dataset=tiny_prompt_dataset(8))


def test_config_docstring_documents_each_field_fipo_adds_or_changes_with_its_default():
    """The `Parameters:` block is TRL's format (what a docs builder renders): an entry for every field FIPOConfig adds
    or whose default it changes, stating the default the field really has, and no entry for a field that is gone."""
    entries = dict(re.findall(
        r"^ {8}(\w+) \(`[^`]+`(?:, \*optional\*)?(?:, defaults to `([^`]*)`)?\):$", FIPOConfig.__doc__, re.M))
    grpo_defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    fipo_fields = {f.name: f for f in dataclasses.fields(FIPOConfig)}
    needed = {name for name, f in fipo_fields.items()
              if name not in grpo_defaults or f.default != grpo_defaults[name]}
    assert "fipo_decay_rate" in needed and "loss_type" in needed and "dynamic_sampling" in needed
    assert needed - set(entries) == set(), "add these fields to FIPOConfig's `Parameters:` docstring block"
    assert set(entries) - set(fipo_fields) == set(), "these docstring entries name no FIPOConfig field"
    for name, documented in entries.items():
        default = fipo_fields[name].default
        expected = "" if default is None else f'"{default}"' if isinstance(default, str) else repr(default)
        assert documented == expected, f"{name}: the docstring says `{documented}`, the field's default is {default!r}"


def test_hook_fails_loudly_if_trl_reads_advantages_first(tiny_model_path, tmp_path, monkeypatch):
    args = FIPOConfig(**config_kwargs(tmp_path))
    trainer = FIPOTrainer(model=tiny_model_path, reward_funcs=digit_reward, args=args,
                          train_dataset=tiny_prompt_dataset(8))
    batch, _ = crafted_micro_batch(trainer, AutoTokenizer.from_pretrained(tiny_model_path))
    trainer.current_gradient_accumulation_steps = 1

    def reads_advantages_first(self, model, inputs):
        return inputs["advantages"].sum()

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", reads_advantages_first)
    with pytest.raises(RuntimeError, match="advantages read before the forward pass"):
        trainer._compute_loss(trainer.model, batch)

    def never_runs_the_forward(self, model, inputs):
        return torch.zeros(())

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", never_runs_the_forward)
    with pytest.raises(RuntimeError, match="never ran"):
        trainer._compute_loss(trainer.model, batch)


def test_model_card_written_on_save_cites_fipo(tiny_model_path, tmp_path):
    train(FIPOTrainer, FIPOConfig, tiny_model_path, tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "FIPO" in card and "2603.19835" in card and "Future-KL Influenced Policy Optimization" in card
    assert "- fipo" in card and "@article{fipo2026" in card
    assert (tmp_path / "out" / "checkpoint-2" / "model.safetensors").exists()


def test_a_loss_path_that_bypasses_the_hook_stops_training(tiny_model_path, tmp_path, monkeypatch):
    """Newer TRL routes compute_loss around _compute_loss for its Liger loss: FIPO weights would silently vanish."""

    def liger_like_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return sum(p.sum() for p in model.parameters()) * 0.0  # a loss computed elsewhere

    monkeypatch.setattr(GRPOTrainer, "compute_loss", liger_like_compute_loss)
    with pytest.raises(RuntimeError, match="bypassed: GRPOTrainer.compute_loss did not call _compute_loss"):
        train(FIPOTrainer, FIPOConfig, tiny_model_path, tmp_path)
