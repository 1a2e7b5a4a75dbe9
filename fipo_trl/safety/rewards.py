"""Reward functions as FIPOTrainer calls them: under an optional time limit per call, with their output checked.

TRL turns each reward function's list into a tensor, and the rewards into advantages, without looking at them: an
infinite reward made its group's advantages 0 or NaN (a run that trained on nothing, with exit status 0), a string
failed inside ``torch.tensor`` ("too many dimensions 'str'"), a bare number in a list comprehension, and a function
that never returned hung training forever. FIPOTrainer wraps every callable reward function (sync or async, as TRL
tells them apart) in a :class:`CheckedReward`; each of those cases is then an error naming the function and the
completion. What TRL receives are the checked rewards: floats, and None for "no reward from this function".
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import math
import numbers
import threading
import time
from collections.abc import Iterable

import numpy
import torch

# TRL computes each group's mean and std in float32: beyond ~1.8e19 a squared deviation overflows (float32's max is
# 3.4e38) and every advantage of the group becomes 0 or NaN. 1e18 leaves room for groups of hundreds.
MAX_REWARD = 1e18
MAX_TIMEOUT_SECONDS = 24 * 3600.0  # a day: a longer limit is a mistake (and overflows the thread and asyncio waits)


def check_reward_timeout(value) -> float | None:
    """FIPOConfig.reward_func_timeout_seconds: None, or a number of seconds > 0 and <= a day."""
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not 0 < value <= MAX_TIMEOUT_SECONDS):
        raise ValueError(f"`reward_func_timeout_seconds` = {value!r} is invalid: it must be a number of seconds > 0 "
                         f"and <= {MAX_TIMEOUT_SECONDS:g}, or None for no limit. Fix: set the longest one call of a "
                         "reward function may take, e.g. 600.")
    return float(value)


class CheckedReward:
    """A sync reward function, checked (see the module docstring). ``calls`` counts its calls."""

    def __init__(self, func, name: str, timeout_seconds: float | None = None):
        self.func, self.__name__, self.timeout_seconds = func, name, timeout_seconds
        self.calls = 0

    def __call__(self, **kwargs) -> list[float | None]:
        self.calls += 1
        private = private_copies(kwargs)  # what the function gets; the checks read the originals
        if self.timeout_seconds is None:
            try:
                return self.checked(self.func(**private), kwargs)
            except SystemExit as error:
                raise self.exit_error(error) from None
        # In a daemon thread, so that a call that never returns can be abandoned (a thread cannot be killed).
        outcome, grad_enabled = {}, torch.is_grad_enabled()

        def run():
            try:
                with torch.set_grad_enabled(grad_enabled):  # the caller's mode (a new thread starts with grad on)
                    outcome["rewards"] = self.func(**private)
            except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
                outcome["error"] = error

        worker = threading.Thread(target=run, name=f"reward function {self.__name__}", daemon=True)
        worker.start()
        worker.join(self.timeout_seconds)
        if worker.is_alive():
            raise TimeoutError(self._timeout_message(kwargs))
        if isinstance(outcome.get("error"), SystemExit):
            raise self.exit_error(outcome["error"])
        if "error" in outcome:
            raise outcome["error"]
        return self.checked(outcome["rewards"], kwargs)

    def exit_error(self, error: SystemExit) -> RuntimeError:
        """A reward function that ended the process (sys.exit) would end training with that exit status, 0 even,
        and no word: an error naming the function instead."""
        return RuntimeError(f"reward function {self.__name__!r} called sys.exit({error.code!r}): a reward function "
                            "must return its rewards, never end the process. Training stops here; the checkpoints "
                            "saved so far are intact. Fix: raise an exception in it, or return None for a "
                            "completion it cannot score.")

    def _timeout_message(self, kwargs) -> str:
        return (f"reward function {self.__name__!r} did not return within reward_func_timeout_seconds = "
                f"{self.timeout_seconds:g} s (one call scores {len(kwargs.get('prompts') or ())} completions); it "
                "may be stuck (a network call, a lock, an endless loop). Fix: make it return, or raise "
                "reward_func_timeout_seconds.")

    def checked(self, output, kwargs) -> list[float | None]:
        """``output`` as a list of finite floats and Nones, one per completion; else an error naming the function
        and the completion."""
        name, prompts = self.__name__, kwargs.get("prompts")
        expected = "one reward per completion" + ("" if prompts is None else f" ({len(prompts)} here)")
        if isinstance(output, (torch.Tensor, numpy.ndarray)) and output.ndim == 1:
            output = output.tolist()
        if isinstance(output, (str, bytes, dict, set, frozenset)) or not isinstance(output, Iterable):
            raise TypeError(f"reward function {name!r} returned {output!r:.80} (a {type(output).__name__}), not a "
                            f"list of rewards: it must return {expected}, each a number or None. Fix: return a list, "
                            "e.g. [score(c) for c in completions].")
        output = list(output)
        if prompts is not None and len(output) != len(prompts):
            raise ValueError(f"reward function {name!r} returned {len(output)} rewards; it must return {expected}.")
        rewards = []
        for i, value in enumerate(output):
            where = f"completion {i}" + ("" if prompts is None else f" (prompt {str(prompts[i])!r:.60})")
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise TypeError(f"reward function {name!r} returned {value!r:.80} (a {type(value).__name__}) for "
                                f"{where}: each reward must be a number, or None to leave the completion out of this "
                                "reward. Fix: return float(...).")
            try:
                number = None if value is None else float(value)
            except OverflowError:
                raise ValueError(f"reward function {name!r} returned {value!r:.40} for {where}, a number too large "
                                 f"for a float. Rewards must be within +-{MAX_REWARD:g}. Fix: scale the "
                                 "reward down.") from None
            if number is not None and math.isfinite(number) and abs(number) > MAX_REWARD:
                raise ValueError(f"reward function {name!r} returned {number:g} for {where}: rewards must be within "
                                 f"+-{MAX_REWARD:g} (TRL computes each group's advantages in float32, where larger "
                                 "rewards overflow and make every advantage 0 or NaN). Fix: scale the reward down.")
            if number is not None and not math.isfinite(number):
                raise ValueError(f"reward function {name!r} returned {value} for {where}: rewards must be finite "
                                 "(an infinite reward makes the advantages of its group 0 or NaN: the run trains "
                                 "on nothing). Fix: return a finite number, or None to leave the completion out of "
                                 "this reward.")
            rewards.append(number)
        return rewards


_SCALARS = (str, bytes, int, float, bool, type(None))


def _copy(value):
    """A copy of the lists and dicts in ``value`` (the scalars they hold are immutable and shared). A list of scalars
    is copied at C speed: 512 completions x 20,480 token ids take 0.1 s, where copy.deepcopy takes 1.7 s."""
    if isinstance(value, list):
        return list(value) if not value or isinstance(value[0], _SCALARS) else [_copy(item) for item in value]
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    return copy.deepcopy(value) if isinstance(value, (set, bytearray)) else value


def private_copies(kwargs: dict) -> dict:
    """Each reward function gets its own copy of the per-completion lists (prompts, completions, ids, dataset
    columns): one that edits them in place cannot change what the next function scores."""
    return {key: _copy(value) if isinstance(value, list) else value for key, value in kwargs.items()}


def is_async_callable(func) -> bool:
    """Whether calling ``func`` returns a coroutine: TRL's own test (trl.trainer.utils.is_async_callable, TRL >= 1.14),
    here so that older TRL releases import it too. A callable instance carries its ``async`` on ``__call__``."""
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(func.__call__)


class CheckedAsyncReward(CheckedReward):
    """An async reward function, checked; TRL awaits it on its event loop (under a time limit, on one of its own)."""

    def __init__(self, func, name: str, timeout_seconds: float | None = None):
        super().__init__(func, name, timeout_seconds)
        # TRL < 1.14 tells async rewards apart with inspect.iscoroutinefunction(func) alone, which is False for a
        # callable instance unless it looks like a function: these attributes make it read as the async __call__.
        self.__code__, self.__defaults__, self.__kwdefaults__ = type(self).__call__.__code__, None, None
        self.__annotations__ = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, **kwargs) -> list[float | None]:
        self.calls += 1
        private = private_copies(kwargs)  # what the function gets; the checks read the originals

        async def call():  # SystemExit becomes the error inside the task: asyncio would let it stop the loop
            try:
                return await self.func(**private)
            except SystemExit as error:
                raise self.exit_error(error) from None

        if self.timeout_seconds is None:
            return self.checked(await call(), kwargs)
        start = time.monotonic()
        running = asyncio.run_coroutine_threadsafe(call(), self._own_loop())
        try:
            output = await asyncio.wait_for(asyncio.wrap_future(running), self.timeout_seconds)
        except TimeoutError:
            if time.monotonic() - start < self.timeout_seconds:
                raise  # the function's own timeout, not ours
            raise TimeoutError(self._timeout_message(kwargs)) from None
        return self.checked(output, kwargs)

    def _own_loop(self) -> asyncio.AbstractEventLoop:
        """Under a time limit the function runs on an event loop of its own, in a daemon thread: a coroutine that
        blocks its loop (time.sleep, a blocking socket) would block TRL's loop too, where no timer could fire. The
        loop lives as long as this wrapper, so state bound to it (a client session) carries over between calls."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name=f"reward function {self.__name__}",
                             daemon=True).start()
        return self._loop


def checked_reward(func, name: str, timeout_seconds: float | None = None) -> CheckedReward:
    """``func`` wrapped by :class:`CheckedReward`, or by :class:`CheckedAsyncReward` when it is async (TRL awaits
    those)."""
    return (CheckedAsyncReward if is_async_callable(func) else CheckedReward)(func, name, timeout_seconds)


class CheckedRewardsMixin:
    """Mix in before ``GRPOTrainer`` (FIPOTrainer does): every callable reward function runs as a
    :class:`CheckedReward` under ``reward_func_timeout_seconds`` (reward models stay TRL's), and training stops with
    an error if TRL ever scores completions without calling them, so the checks cannot silently stop running."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reward_funcs = [func if isinstance(func, torch.nn.Module)
                             else checked_reward(func, name, self.args.reward_func_timeout_seconds)
                             for func, name in zip(self.reward_funcs, self.reward_func_names, strict=True)]

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        from fipo_trl.safety.versions import supported_range

        pairs = list(zip(self.reward_funcs, self.reward_func_names))
        unchecked = [name for func, name in pairs if not isinstance(func, (CheckedReward, torch.nn.Module))]
        calls = {name: func.calls for func, name in pairs if isinstance(func, CheckedReward)}
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        unchecked += [name for func, name in pairs if isinstance(func, CheckedReward) and func.calls == calls[name]]
        if unchecked:
            raise RuntimeError(f"FIPOTrainer's reward checks did not run for {unchecked}: this TRL version calls the "
                               "reward functions some other way, so non-finite or malformed rewards and the time "
                               f"limit would go unchecked. Install a TRL version fipo_trl supports "
                               f"({supported_range('trl')}).")
        return rewards_per_func
