"""Reward functions that misbehave: each is an error naming the function (and the completion), not a hang, a run
that trains on nothing, or a crash inside torch.tensor. Through TRL's own GRPOTrainer._calculate_rewards, sync and
async."""

import asyncio
import math
import time

import numpy as np
import pytest
import torch

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.safety.rewards import CheckedAsyncReward, CheckedReward
from fipo_trl.tools.tiny import tiny_prompt_dataset

N = 4  # completions per reward call in these tests


def make_trainer(model_path, tmp_path, reward_funcs, **overrides):
    args = FIPOConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=N, num_generations=N,
                      max_completion_length=4, report_to="none", max_steps=1, fipo_updates_per_generation=2,
                      logging_steps=1, save_strategy="no", **overrides)
    return FIPOTrainer(model=model_path, reward_funcs=reward_funcs, args=args, train_dataset=tiny_prompt_dataset(8))


def rewards_of(trainer):
    """TRL's _calculate_rewards on N rows, as its generate-and-score step calls it."""
    prompts = [f"prompt {i}" for i in range(N)]
    inputs = [{"prompt": p, "answer": str(i)} for i, p in enumerate(prompts)]
    return trainer._calculate_rewards(inputs, prompts, [f"completion {i}" for i in range(N)], [[1, 2]] * N)


def constant(value):
    def reward(completions, **kwargs):
        return [value] * len(completions)

    return reward


def one_bad(value, row=2):
    def odd_reward(completions, **kwargs):
        return [value if i == row else 1.0 for i in range(len(completions))]

    return odd_reward


def async_version(func):
    async def async_reward(completions, **kwargs):
        await asyncio.sleep(0)
        return func(completions, **kwargs)

    return async_reward


@pytest.fixture
def trainer_with(tiny_model_path, tmp_path):
    return lambda *funcs, **overrides: make_trainer(tiny_model_path, tmp_path, list(funcs), **overrides)


@pytest.mark.parametrize("wrap", [lambda f: f, async_version], ids=["sync", "async"])
@pytest.mark.parametrize(("value", "match"), [
    (math.inf, r"returned inf for completion 2 \(prompt 'prompt 2'\): rewards must be finite"),
    (-math.inf, "returned -inf for completion 2"),
    (math.nan, "returned nan for completion 2"),
    ("1.0", r"returned '1.0' \(a str\) for completion 2 .*a number, or None"),
    ([1.0], r"returned \[1.0\] \(a list\) for completion 2"),
    (True, r"returned True \(a bool\) for completion 2"),
])
def test_a_bad_reward_names_the_function_and_the_completion(trainer_with, wrap, value, match):
    func = wrap(one_bad(value))
    func.__name__ = "odd_reward"
    trainer = trainer_with(func)
    with pytest.raises((ValueError, TypeError), match=f"reward function 'odd_reward' {match}"):
        rewards_of(trainer)


@pytest.mark.parametrize("wrap", [lambda f: f, async_version], ids=["sync", "async"])
@pytest.mark.parametrize("output", [0.5, "1.0", None, {"a": 1.0}])
def test_a_reward_function_must_return_a_list(trainer_with, wrap, output):
    trainer = trainer_with(wrap(lambda completions, **kwargs: output))
    with pytest.raises(TypeError, match=r"reward function '.*' returned .*not a list of rewards: it must return one "
                                        r"reward per completion \(4 here\)"):
        rewards_of(trainer)


def test_good_rewards_of_every_numeric_kind_pass_and_none_stays_none(trainer_with):
    kinds = [lambda completions, **k: [1, 0.5, np.float32(0.25), None],
             lambda completions, **k: np.array([1.0, 2.0, 3.0, 4.0]),
             lambda completions, **k: torch.tensor([1.0, 2.0, 3.0, 4.0]),
             lambda completions, **k: (torch.tensor(1.0), 2, 3, 4)]
    rewards = rewards_of(trainer_with(*kinds))
    assert rewards.shape == (N, 4) and math.isnan(rewards[3, 0])
    assert rewards[:3, 0].tolist() == [1.0, 0.5, 0.25] and rewards[:, 1].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_none_is_trls_no_reward_even_for_the_whole_batch(trainer_with, caplog):
    # As GRPOTrainer (TRL's own test_warning_raised_all_rewards_none trains through it): TRL warns, the rows'
    # rewards sum to 0. A dataset without math_verify_reward's reference answers is refused before the model loads
    # (test_data_checks.py).
    with caplog.at_level("WARNING", logger="trl.trainer.grpo_trainer"):
        assert rewards_of(trainer_with(constant(None), constant(None))).isnan().all()
    assert "All reward functions returned None" in caplog.text
    assert rewards_of(trainer_with(constant(None), one_bad(None))).isnan().sum() == N + 1


@pytest.mark.parametrize("kind", ["sync", "async", "async blocking its loop"])
def test_a_reward_function_that_never_returns_is_stopped_by_the_time_limit(trainer_with, kind):
    if kind == "async":
        async def stuck_reward(completions, **kwargs):
            await asyncio.sleep(3600)
    elif kind == "async blocking its loop":  # time.sleep blocks the loop it runs on: no asyncio timer there fires
        async def stuck_reward(completions, **kwargs):
            time.sleep(3600)
    else:
        def stuck_reward(completions, **kwargs):
            time.sleep(3600)

    trainer = trainer_with(stuck_reward, reward_func_timeout_seconds=0.3)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"reward function 'stuck_reward' did not return within "
                                           r"reward_func_timeout_seconds = 0.3 s.*Fix"):
        rewards_of(trainer)
    assert time.monotonic() - start < 30


def test_under_the_time_limit_errors_and_grad_mode_reach_the_caller(trainer_with):
    def failing_reward(completions, **kwargs):
        raise KeyError("solution")

    def grad_mode_reward(completions, **kwargs):
        return [float(torch.is_grad_enabled())] * len(completions)

    with pytest.raises(KeyError, match="solution"):
        rewards_of(trainer_with(failing_reward, reward_func_timeout_seconds=5))
    with torch.no_grad():
        assert rewards_of(trainer_with(grad_mode_reward, reward_func_timeout_seconds=5)).sum() == 0


def test_async_functions_stay_async_and_a_broken_hook_is_reported(trainer_with):
    trainer = trainer_with(constant(1.0), async_version(constant(2.0)))
    assert [type(f) for f in trainer.reward_funcs] == [CheckedReward, CheckedAsyncReward]
    assert rewards_of(trainer).tolist() == [[1.0, 2.0]] * N
    trainer.reward_funcs[0] = trainer.reward_funcs[0].func  # as if TRL called the functions some other way
    with pytest.raises(RuntimeError, match=r"reward checks did not run for \['reward'\]"):
        rewards_of(trainer)


@pytest.mark.parametrize("value", [math.nan, math.inf, 0.0, -1.0, 1e12, "10"])
def test_the_time_limit_is_validated_in_the_config(tmp_path, value):
    with pytest.raises(ValueError, match=r"`reward_func_timeout_seconds` = .* is invalid"):
        FIPOConfig(output_dir=str(tmp_path), reward_func_timeout_seconds=value)
    assert FIPOConfig(output_dir=str(tmp_path), reward_func_timeout_seconds=600).reward_func_timeout_seconds == 600


def test_an_infinite_reward_stops_training_instead_of_training_at_loss_0(trainer_with):
    """It used to zero its group's advantages: the run "trained" at loss 0 and exited 0."""
    trainer = trainer_with(constant(math.inf))
    with pytest.raises(ValueError, match="reward function 'reward' returned inf for completion 0"):
        trainer.train()
    assert trainer.state.global_step == 0


# --- Round 3 (docs/reliability.md) ------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", [lambda f: f, async_version], ids=["sync", "async"])
@pytest.mark.parametrize(("value", "match"), [
    (10**400, r"returned 1000000000000000000000000000000000000000 for completion 2 .*too large for a float"),
    (1e308, r"returned 1e\+308 for completion 2 .*within \+-1e\+18"),
    (-1e20, r"returned -1e\+20 for completion 2 .*within \+-1e\+18"),
])
def test_a_reward_too_large_for_float32_advantages_names_the_function(trainer_with, wrap, value, match):
    func = wrap(one_bad(value))
    func.__name__ = "odd_reward"
    with pytest.raises(ValueError, match=f"reward function 'odd_reward' {match}"):
        rewards_of(trainer_with(func))


def test_rewards_up_to_the_limit_still_give_advantages(trainer_with):
    # 1e18 and -1e18 in one group: TRL's float32 std stays finite, so the group has non-zero advantages
    rewards = rewards_of(trainer_with(lambda completions, **k: [1e18, -1e18, 0.0, 1e18]))[:, 0]
    assert rewards.dtype == torch.float32 and rewards.tolist() == pytest.approx([1e18, -1e18, 0.0, 1e18], rel=1e-7)
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)  # TRL's group normalisation, in float32
    assert torch.isfinite(advantages).all() and advantages.abs().min() > 0.1


@pytest.mark.parametrize("timeout", [None, 5.0], ids=["no-limit", "time-limit"])
@pytest.mark.parametrize("wrap", [lambda f: f, async_version], ids=["sync", "async"])
@pytest.mark.parametrize("code", [0, 3])
def test_a_reward_that_calls_sys_exit_is_an_error_naming_it(trainer_with, wrap, code, timeout):
    def exiting_reward(completions, **kwargs):
        raise SystemExit(code)

    func = wrap(exiting_reward)
    func.__name__ = "exiting_reward"
    trainer = trainer_with(func, reward_func_timeout_seconds=timeout)
    with pytest.raises(RuntimeError, match=rf"reward function 'exiting_reward' called sys.exit\({code}\).*Fix"):
        rewards_of(trainer)


def test_a_reward_that_edits_its_inputs_in_place_cannot_change_what_the_next_one_scores(trainer_with):
    seen = []

    def vandal_reward(completions, prompts, completion_ids, **kwargs):
        completions[0] = "rewritten"
        completions.append("extra")
        prompts.clear()
        completion_ids[1].append(99)  # the token ids of one completion, edited in place
        return [0.0] * 4

    def honest_reward(completions, prompts, completion_ids, **kwargs):
        seen.append((list(completions), list(prompts), [list(ids) for ids in completion_ids]))
        return [1.0] * len(completions)

    rewards_of(trainer_with(vandal_reward, honest_reward))
    assert seen == [([f"completion {i}" for i in range(N)], [f"prompt {i}" for i in range(N)], [[1, 2]] * N)]


def test_the_private_copies_copy_every_mutable_level_and_share_the_scalars():
    from fipo_trl.safety.rewards import private_copies

    chat = [[{"role": "assistant", "content": "2"}]]
    original = {"completions": chat, "completion_ids": [[1, 2]], "answer": ["2"], "trainer_state": object()}
    copies = private_copies(original)
    copies["completions"][0][0]["content"] = "3"
    copies["completion_ids"][0].append(3)
    assert chat == [[{"role": "assistant", "content": "2"}]] and original["completion_ids"] == [[1, 2]]
    assert copies["trainer_state"] is original["trainer_state"]  # not a per-completion list: passed as it is


def test_an_async_reward_under_a_time_limit_keeps_its_own_loop_between_calls(trainer_with):
    loops = []

    async def loop_reward(completions, **kwargs):
        loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0)
        return [0.0] * len(completions)

    trainer = trainer_with(loop_reward, reward_func_timeout_seconds=5.0)
    rewards_of(trainer)
    rewards_of(trainer)
    assert len(loops) == 2 and loops[0] is loops[1]  # state bound to the loop (a client session) carries over
