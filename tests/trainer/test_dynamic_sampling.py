"""Dynamic sampling (DAPO filter_groups): uniform groups are dropped and replaced, bounded retries, logged."""

import pytest
import torch
from trl import GRPOTrainer

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.dynamic_sampling import concat_generation_outputs, group_keep_mask, select_rows
from fipo_trl.tools.tiny import digit_reward, tiny_prompt_dataset

G = 4


def odd_answers_uniform(completions, answer, **kwargs):
    """Every completion of a prompt whose answer is odd gets 1.0 (a uniform group); the others get the toy reward,
    which varies with the completion."""
    varied = digit_reward(completions, answer=answer)
    return [1.0 if int(a) % 2 == 1 else r for a, r in zip(answer, varied)]


def constant_reward(completions, **kwargs):
    return [0.5] * len(completions)


def make_trainer(model, tmp_path, reward, **overrides):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=G, max_completion_length=8,
                  steps_per_generation=4, max_steps=8, learning_rate=1e-2, report_to="none", logging_steps=1,
                  save_strategy="no", bf16=False, seed=0, disable_tqdm=True, dynamic_sampling=True,
                  dynamic_sampling_max_retries=8)
    kwargs.update(overrides)
    return FIPOTrainer(model=model, reward_funcs=reward, args=FIPOConfig(**kwargs),
                       train_dataset=tiny_prompt_dataset(32))


def record_batches(trainer):
    """Record what the dynamic-sampling hook hands to TRL (before TRL shuffles and splits it)."""
    batches, original = [], trainer._generate_and_score_completions

    def recording(inputs):
        batch = original(inputs)
        batches.append(batch)
        return batch

    trainer._generate_and_score_completions = recording
    return batches


def logged(trainer, name):
    return [h[name] for h in trainer.state.log_history if name in h]


def test_trained_batches_hold_only_mixed_groups(tiny_model_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tmp_path, odd_answers_uniform)
    batches = record_batches(trainer)
    trainer.train()
    assert len(batches) == 2  # 8 optimizer steps, 4 per generation batch
    tokenizer = trainer.processing_class
    for batch in batches:
        assert len(batch["advantages"]) == 16  # the usual generation batch: 4 groups of 4
        prompts = tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
        for g in range(0, 16, G):
            group_prompts = set(prompts[g:g + G])
            assert len(group_prompts) == 1  # groups stay whole and contiguous
            assert batch["advantages"][g:g + G].abs().max() > 0.1  # not a uniform group
        assert batch["num_items_in_batch"] == batch["completion_mask"].sum()
    # Every uniform group is an odd-answer prompt; none of them made it into a trained batch.
    words = tokenizer.batch_decode(torch.cat([b["prompt_ids"] for b in batches]), skip_special_tokens=True)
    numbers = ["one", "two", "three", "four"]
    sums = [sum(numbers.index(w) + 1 for w in p.split() if w in numbers) for p in words]
    assert sums and all(s % 2 == 0 for s in sums)
    dropped = logged(trainer, "dynamic_sampling/dropped_groups")
    assert dropped and sum(dropped) > 0
    assert all(f == 0 for f in logged(trainer, "dynamic_sampling/filled_groups"))


def test_retry_bound_and_fill_when_every_group_is_uniform(tiny_model_path, tmp_path, monkeypatch):
    calls = []
    original = GRPOTrainer._generate_and_score_completions

    def counting(self, inputs):
        calls.append(len(inputs))
        return original(self, inputs)

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", counting)
    trainer = make_trainer(tiny_model_path, tmp_path, constant_reward, max_steps=4, dynamic_sampling_max_retries=2)
    batches = record_batches(trainer)
    with pytest.warns(UserWarning, match="filling the batch with 4 uniform groups"):
        trainer.train()
    assert calls == [16, 16, 16]  # the dataloader's batch + 2 retries, then it stops
    assert len(batches) == 1 and len(batches[0]["advantages"]) == 16
    assert torch.all(batches[0]["advantages"] == 0)
    assert logged(trainer, "dynamic_sampling/retries")[0] == 2
    assert logged(trainer, "dynamic_sampling/filled_groups")[0] == 4
    assert logged(trainer, "dynamic_sampling/dropped_ratio")[0] == 1.0


def test_config_checks(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="per group"):
        make_trainer(tiny_model_path, tmp_path, constant_reward, scale_rewards="batch")
    with pytest.raises(ValueError, match="not one of the reward functions"):
        make_trainer(tiny_model_path, tmp_path, constant_reward, dynamic_sampling_metric="accuracy")


def test_hook_fails_loudly_if_it_stops_running(tiny_model_path, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_model_path, tmp_path, constant_reward, max_steps=1)
    monkeypatch.setattr(trainer, "_generate_and_score_completions",
                        lambda inputs: GRPOTrainer._generate_and_score_completions(trainer, inputs))
    with pytest.raises(RuntimeError, match="never ran"):
        trainer.train()


def test_group_keep_mask_ignores_nan_and_needs_two_values():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0,  # uniform
                            1.0, 0.0, 1.0, 1.0,  # mixed
                            float("nan"), 2.0, 2.0, float("nan"),  # uniform among the scored ones
                            float("nan"), float("nan"), float("nan"), 3.0])  # one scored completion
    assert group_keep_mask(rewards, 4).tolist() == [False, True, False, False]


def test_concat_pads_each_side_and_recounts_tokens():
    a = {"prompt_ids": torch.tensor([[5, 6]]), "prompt_mask": torch.tensor([[1, 1]]),
         "completion_ids": torch.tensor([[7, 8, 9]]), "completion_mask": torch.tensor([[1, 1, 1]]),
         "advantages": torch.tensor([1.0]), "num_items_in_batch": torch.tensor(99)}
    b = {"prompt_ids": torch.tensor([[4, 5, 6]]), "prompt_mask": torch.tensor([[1, 1, 1]]),
         "completion_ids": torch.tensor([[7, 0, 0, 0]]), "completion_mask": torch.tensor([[1, 0, 0, 0]]),
         "advantages": torch.tensor([-1.0]), "num_items_in_batch": torch.tensor(99)}
    merged = concat_generation_outputs([a, b], pad_token_id=0)
    assert merged["prompt_ids"].tolist() == [[0, 5, 6], [4, 5, 6]]  # left padding
    assert merged["prompt_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert merged["completion_ids"].tolist() == [[7, 8, 9], [7, 0, 0]]  # right padding, all-pad column trimmed
    assert merged["completion_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert merged["num_items_in_batch"] == 4 and merged["advantages"].tolist() == [1.0, -1.0]
    assert select_rows(merged, torch.tensor([1]))["advantages"].tolist() == [-1.0]
    with pytest.raises(ValueError, match="pixel_values"):
        concat_generation_outputs([{**a, "pixel_values": torch.zeros(1, 3)}], pad_token_id=0)


def test_the_mixin_brings_dynamic_sampling_to_a_plain_grpo_trainer(tiny_model_path, tmp_path):
    """Dynamic sampling is not FIPO: mixed into GRPOTrainer and GRPOConfig it drops the uniform groups there too."""
    from dataclasses import dataclass

    from trl import GRPOConfig

    from fipo_trl.dynamic_sampling import DynamicSamplingConfig, DynamicSamplingMixin

    @dataclass
    class SamplingGRPOConfig(DynamicSamplingConfig, GRPOConfig):
        pass

    class SamplingGRPOTrainer(DynamicSamplingMixin, GRPOTrainer):
        pass

    args = SamplingGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=G,
                              max_completion_length=8, steps_per_generation=4, max_steps=4, report_to="none",
                              logging_steps=1, save_strategy="no", bf16=False, seed=0, disable_tqdm=True,
                              dynamic_sampling=True, dynamic_sampling_max_retries=8)
    trainer = SamplingGRPOTrainer(model=tiny_model_path, reward_funcs=odd_answers_uniform, args=args,
                                  train_dataset=tiny_prompt_dataset(32))
    batches = record_batches(trainer)
    trainer.train()
    assert len(batches) == 1 and not isinstance(trainer, FIPOTrainer)
    for g in range(0, 16, G):
        assert batches[0]["advantages"][g:g + G].abs().max() > 0.1  # only mixed groups
    assert sum(logged(trainer, "dynamic_sampling/dropped_groups")) > 0
