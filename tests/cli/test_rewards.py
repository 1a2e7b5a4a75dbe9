"""DAPO reward pieces: the +-1 math verifier (bounded time on adversarial answers) and the overlong penalty."""

import time

import pytest

from fipo_trl.rewards import MathVerifyReward, extract_answer, overlong_penalty


@pytest.fixture(scope="module")
def reward():
    reward = MathVerifyReward(timeout_seconds=2.0)
    yield reward
    reward.verifier.close()


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


@pytest.mark.parametrize("completion, expected", [
    ("so the answer is \\boxed{5}.", 1.0),
    ("\\boxed{\\frac{10}{2}}", 1.0),  # equivalent, not equal
    ("first \\boxed{3}, no wait: \\boxed{5}", 1.0),  # the last box counts
    ("The last line.\nAnswer: 5", 1.0),  # DAPO-Math's requested format
    ("\\boxed{4}", -1.0),  # wrong
    ("five", -1.0),  # no answer
    ("\\boxed{5", -1.0),  # malformed: unbalanced
    ("\\boxed{}", -1.0),  # empty
    ("\\boxed{@@ \\frac{ ^^}", -1.0),  # unparsable
    ("\\boxed{__import__('os').system('echo pwned')}", -1.0),  # never evaluated
])
def test_scores(reward, completion, expected):
    assert reward([completion], answer=["5"]) == [expected]


def test_reference_columns_and_conversational_completions(reward):
    conversation = [{"role": "assistant", "content": "\\boxed{\\frac{1}{2}}"}]
    assert reward([conversation], solution=["0.5"]) == [1.0]
    assert reward(["\\boxed{2}"], reward_model=[{"ground_truth": "2", "style": "rule"}]) == [1.0]
    assert reward(["\\boxed{2}"], answer=[None]) == [None]  # no reference: TRL skips it
    with pytest.raises(ValueError, match="solution"):
        reward(["\\boxed{2}"])


def test_numpy_numbers_are_accepted_as_answers_as_the_message_says(reward):
    import numpy as np

    assert reward(["\\boxed{3}", "\\boxed{2.5}"], answer=[np.int64(3), np.float32(2.5)]) == [1.0, 1.0]
    assert reward(["\\boxed{3}"], answer=[np.int32(4)]) == [-1.0]


@pytest.mark.parametrize("answer", [
    "10^{10^{10}}",  # a huge number, as LaTeX
    "10**10**10",  # ... and as Python text (never evaluated)
    "(10^{10})!",
    "{" * 400 + "1" + "}" * 400,  # deeply nested (under the length cap: parsed)
    "\\frac{1}{" * 80 + "2" + "}" * 80,  # deeply nested fractions
])
def test_adversarial_answers_return_in_bounded_time(reward, answer):
    (score,), seconds = timed(reward, ["\\boxed{" + answer + "}"], answer=["5"])
    assert score == -1.0
    assert seconds < 2.0 + 1.0  # the hard limit (2 s) plus slack for killing the worker


def test_megabyte_completions(reward):
    (score,), seconds = timed(reward, ["x" * 1_000_000 + " \\boxed{5}"], answer=["5"])
    assert score == 1.0 and seconds < 1.0  # extraction is linear; only the short answer is parsed
    (score,), seconds = timed(reward, ["\\boxed{" + "1" * 1_000_000 + "}"], answer=["5"])
    assert score == -1.0 and seconds < 1.0  # over max_answer_chars: no answer, nothing parsed
    assert extract_answer("{" * 500_000 + "\\boxed{" + "{" * 500_000) is None  # unbalanced, linear scan


def test_hard_timeout_kills_and_restarts_the_worker():
    # A 0.5 s limit is below math-verify's own (signal) timeout of 1 s, so the parent's hard limit must act.
    reward = MathVerifyReward(timeout_seconds=0.5)
    try:
        assert reward(["\\boxed{5}"], answer=["5"]) == [1.0]  # starts the worker
        (score,), seconds = timed(reward, ["\\boxed{(10^{10})!}"], answer=["5"])
        assert score == -1.0 and seconds < 1.5 and reward.verifier.timeouts == 1
        assert reward(["\\boxed{5}"], answer=["5"]) == [1.0]  # a fresh worker answers the next call
    finally:
        reward.verifier.close()


def test_works_from_threads(reward):
    """TRL runs async reward functions on an event-loop thread: signal-based timeouts would fail there."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        scores = list(pool.map(lambda c: reward([c], answer=["5"])[0], ["\\boxed{5}", "\\boxed{4}"] * 4))
    assert scores == [1.0, -1.0] * 4


def test_overlong_penalty_hand_values():
    penalty = overlong_penalty(max_completion_length=20, buffer_length=4)  # penalty from 16 tokens on
    lengths = [10, 16, 17, 18, 20, 24]
    assert penalty(completion_ids=[[0] * n for n in lengths]) == pytest.approx([0, 0, -0.25, -0.5, -1.0, -2.0])
    assert overlong_penalty(20480, 4096)(completion_ids=[[0] * 18432]) == [-0.5]  # official 32B values
    assert overlong_penalty(20, 4, penalty_factor=0.5)(completion_ids=[[0] * 20]) == [-0.5]
    assert penalty.__name__ == "overlong_penalty"
    with pytest.raises(ValueError):
        overlong_penalty(10, 20)


@pytest.mark.parametrize("reference", ["\\frac{", "\\sqrt[", "\\begin{cases}"])
def test_a_reference_that_never_parses_is_named_once(reference):
    import warnings

    reward = MathVerifyReward(timeout_seconds=2.0)
    try:
        with pytest.warns(UserWarning, match=r"math_verify_reward: the reference answer .* does not parse .*every "
                                             r"completion for its row scores -1. Fix: repair"):
            assert reward(["\\boxed{1}", "\\boxed{1}"], answer=[reference, reference]) == [-1.0, -1.0]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # named once: no second warning for the same reference
            assert reward(["\\boxed{2}", "\\boxed{2}"], answer=[reference, "2"]) == [-1.0, 1.0]
        assert reward.unparseable == {reference}
    finally:
        reward.verifier.close()
