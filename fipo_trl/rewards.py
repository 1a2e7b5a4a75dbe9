"""DAPO reward pieces used by the official FIPO recipe, as TRL reward functions.

* :class:`MathVerifyReward` (instance :data:`math_verify_reward`): the +-1 math-verifier score. The completion's answer
  is the content of its last ``\\boxed{...}`` (or, failing that, its last ``Answer: ...`` line, the DAPO-Math prompt
  format); math-verify decides equivalence with the reference answer. Scores: **+1.0** equivalent; **-1.0** for a
  wrong answer, no answer, an unbalanced ``\\boxed{``, an answer longer than ``max_answer_chars``, an answer
  math-verify cannot parse, or a check that exceeds the time limit; ``None`` (TRL leaves the completion out of this
  reward) when the row has no reference answer.
  The reference answer is read from the dataset column ``solution`` (TRL's convention, e.g. DeepMath), else
  ``answer``, else ``reward_model["ground_truth"]`` (the verl / DAPO-Math-17k parquet layout).
* :func:`overlong_penalty`: DAPO's soft overlong penalty, added to the score: ``min(-(L - (max - buffer)) / buffer, 0)
  * factor`` for a completion of L tokens, exactly the official formula (0 up to max - buffer, -1 at max; below -1 if
  L could exceed max).

Every math-verify call runs in a separate worker process (:class:`MathVerifier`) with a hard wall-clock limit: the
worker is killed and restarted when a check overruns. math-verify's own timeout uses ``signal.alarm``, which only
works in the main thread and cannot interrupt C-level work (e.g. a huge integer power); TRL may call reward
functions from an event-loop thread. Nothing is ever passed to ``eval``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import select
import subprocess
import sys
import threading
import warnings
from pathlib import Path

__all__ = ["MathVerifier", "MathVerifyReward", "OverlongPenalty", "completion_text", "extract_answer",
           "math_verify_reward", "overlong_penalty", "reference_answers"]

_WORKER = Path(__file__).with_name("_math_verify_worker.py")
_BOX_COMMANDS = ("\\boxed", "\\fbox")
MAX_CHECK_SECONDS = 24 * 3600  # one math-verify check's limit; select() and signal.alarm() overflow far above it


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (brace-matched), "" for an unbalanced one, None when there is none."""
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0 or text[start:brace].strip() not in _BOX_COMMANDS:
        return ""
    depth = 0
    for i in range(brace, len(text)):  # linear in the text length: safe on megabyte completions
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1:i]
    return ""


def _last_answer_line(text: str) -> str | None:
    """The rest of the line after the last ``Answer:`` (DAPO-Math's requested format), or None."""
    start = text.lower().rfind("answer:")
    if start < 0:
        return None
    line = text[start + len("answer:"):].split("\n", 1)[0]
    return line.strip().rstrip(".").strip().strip("$").strip()


def extract_answer(completion: str, max_answer_chars: int = 1000) -> str | None:
    """The final answer written in a completion, or None if there is none (or it is empty, unbalanced or longer than
    ``max_answer_chars``, which bounds the cost of parsing it)."""
    answer = _last_boxed(completion)
    if answer is None:
        answer = _last_answer_line(completion)
    if not answer or not answer.strip() or len(answer) > max_answer_chars:
        return None
    return answer.strip()


class MathVerifier:
    """Equivalence checks with math-verify in a worker process, each under a hard wall-clock limit.

    Thread-safe (one request at a time per instance). A check that exceeds ``timeout_seconds`` returns False and
    the worker is killed; the next check starts a fresh one (~1 s: Python plus the math-verify import).
    """

    def __init__(self, timeout_seconds: float = 5.0, startup_timeout_seconds: float = 120.0):
        if not _finite(timeout_seconds) or not 0 < timeout_seconds <= MAX_CHECK_SECONDS:
            raise ValueError(f"timeout_seconds must be a number of seconds in (0, {MAX_CHECK_SECONDS}], got "
                             f"{timeout_seconds!r}.")
        self.timeout_seconds = float(timeout_seconds)
        self.startup_timeout_seconds = startup_timeout_seconds
        self.timeouts = 0  # checks that hit the hard limit (the worker was killed)
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def __getstate__(self):  # picklable for TRL's spawned workers: the process handle stays behind
        return {"timeout_seconds": self.timeout_seconds, "startup_timeout_seconds": self.startup_timeout_seconds}

    def __setstate__(self, state):
        self.__init__(**state)

    def _start(self) -> subprocess.Popen:
        # math-verify's soft (signal) timeout per parse/verify step, in whole seconds; the hard limit covers the sum.
        soft = str(max(1, int(self.timeout_seconds // 3)))
        process = subprocess.Popen(
            [sys.executable, "-P", str(_WORKER), soft], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, bufsize=1, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if self._read(process, self.startup_timeout_seconds) != {"ready": True}:
            self._kill(process)
            raise RuntimeError(f"The math-verify worker ({_WORKER}) did not start. Is math-verify installed "
                               "(pip install 'math-verify>=0.9')?")
        return process

    @staticmethod
    def _read(process: subprocess.Popen, timeout: float) -> dict | None:
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        if not ready:
            return None
        line = process.stdout.readline()
        return json.loads(line) if line else None

    @staticmethod
    def _kill(process: subprocess.Popen) -> None:
        process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout):
            stream.close()

    def _ask(self, request: dict) -> dict | None:
        """The worker's reply to one request, or None when it overran (or died)."""
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._process = self._start()
            try:
                self._process.stdin.write(json.dumps(request) + "\n")
                self._process.stdin.flush()
                reply = self._read(self._process, self.timeout_seconds)
            except (BrokenPipeError, OSError, ValueError):
                reply = None
            if reply is None:  # overran (or died): kill it, the next call starts a fresh worker
                self.timeouts += 1
                self._kill(self._process)
                self._process = None
            return reply

    def equal(self, gold: str, pred: str) -> bool:
        """Whether ``pred`` is mathematically equivalent to ``gold`` (both plain answers, boxed or not)."""
        reply = self._ask({"gold": gold, "pred": pred})
        return reply is not None and bool(reply["equal"])

    def parses(self, text: str) -> bool:
        """Whether math-verify finds an expression in ``text`` (a reference answer that does not parse makes every
        completion wrong)."""
        reply = self._ask({"parse": text})
        return reply is not None and bool(reply.get("parsed"))

    def close(self) -> None:
        with self._lock:
            if self._process is not None:
                self._kill(self._process)
                self._process = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_text(value, what: str) -> str | None:
    """A completion or answer as text: bytes are decoded (UTF-8, bad bytes replaced), numbers written out, None and
    blank text mean "nothing there". Anything else is a caller's bug, named with its place."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="replace")
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy's numbers too
        value = str(value)
    if not isinstance(value, str):
        raise TypeError(f"{what} is a {type(value).__name__}; expected a string (or bytes, a number, or None for "
                        "none). Fix the dataset column or the reward function's caller.")
    return value if value.strip() else None


def completion_text(completion, index: int = 0) -> str:
    """The text of one completion: a string (standard format) or a list of messages (conversational: the last
    message's content). A missing or empty completion reads as "" (it then has no answer and scores as wrong)."""
    if isinstance(completion, (list, tuple)):
        if not completion:
            return ""
        message = completion[-1]
        if not isinstance(message, dict) or "content" not in message:
            raise TypeError(f"completions[{index}] is a list whose last item is not a chat message with a 'content' "
                            f"key (got {type(message).__name__}). Pass strings or lists of {{'role', 'content'}} "
                            "messages.")
        completion = message["content"]
        if isinstance(completion, list):  # multimodal content parts: keep the text parts
            completion = "".join(part.get("text", "") for part in completion if isinstance(part, dict))
    return _as_text(completion, f"completions[{index}]") or ""


def reference_answers(n: int, solution=None, answer=None, reward_model=None) -> list[str | None]:
    """The reference answer of each row: the ``solution`` column, else ``answer``, else
    ``reward_model["ground_truth"]``. A missing (None or blank) reference is None."""
    if solution is not None:
        column, name = solution, "solution"
    elif answer is not None:
        column, name = answer, "answer"
    elif reward_model is not None:
        column, name = [], "reward_model"
        for i, row in enumerate(reward_model):
            if row is not None and not isinstance(row, dict):
                raise TypeError(f"reward_model[{i}] is a {type(row).__name__}; expected a dict with a 'ground_truth' "
                                "key (verl's layout) or None.")
            column.append(None if row is None else row.get("ground_truth"))
    else:
        raise ValueError("math_verify_reward needs the reference answers: a dataset column named 'solution' or "
                         "'answer' (or verl's 'reward_model' with a 'ground_truth' key).")
    if isinstance(column, (str, bytes)) or not hasattr(column, "__len__"):
        raise TypeError(f"`{name}` must be a list with one reference answer per completion, got a "
                        f"{type(column).__name__}.")
    if len(column) != n:
        raise ValueError(f"Got {len(column)} reference answers (`{name}`) for {n} completions: the column must have "
                         "one value per completion.")
    return [_as_text(value, f"{name}[{i}]") for i, value in enumerate(column)]


class MathVerifyReward:
    """DAPO's +-1 correctness reward (see the module docstring for the exact scores)."""

    __name__ = "math_verify_reward"  # TRL logs rewards under the function name

    MAX_NAMED = 10  # unparseable references named in warnings, one each; then one line says more were found

    def __init__(self, timeout_seconds: float = 5.0, max_answer_chars: int = 1000):
        self.max_answer_chars = max_answer_chars
        self.verifier = MathVerifier(timeout_seconds)
        self.unparseable: set[str] = set()  # references math-verify finds no expression in
        self._checked: set[str] = set()

    def check_reference(self, reference: str) -> None:
        """Warn once per reference that never parses (an unclosed \\frac{, \\sqrt[, \\begin{cases}): every
        completion for it would score -1 in silence."""
        if reference in self._checked:
            return
        self._checked.add(reference)
        if self.verifier.parses(reference):
            return
        self.unparseable.add(reference)
        if len(self.unparseable) <= self.MAX_NAMED:
            more = " (further ones are counted in math_verify_reward.unparseable, not named)" \
                if len(self.unparseable) == self.MAX_NAMED else ""
            warnings.warn(f"math_verify_reward: the reference answer {reference!r:.120} does not parse (math-verify "
                          "finds no expression in it), so every completion for its row scores -1. Fix: repair that "
                          f"answer in the dataset, or drop its row{more}.", UserWarning, stacklevel=3)

    def score(self, completion: str, reference: str | None) -> float | None:
        if reference is None:
            return None
        self.check_reference(reference)
        answer = extract_answer(completion, self.max_answer_chars)
        if answer is None:
            return -1.0
        return 1.0 if self.verifier.equal(reference, answer) else -1.0

    def __call__(self, completions, solution=None, answer=None, reward_model=None, **kwargs) -> list[float | None]:
        if completions is None or isinstance(completions, (str, bytes)):
            raise TypeError("math_verify_reward: `completions` must be a list of completions (strings or message "
                            f"lists), got {type(completions).__name__}.")
        references = reference_answers(len(completions), solution, answer, reward_model)
        texts = [completion_text(c, i) for i, c in enumerate(completions)]
        return [self.score(text, reference) for text, reference in zip(texts, references)]


math_verify_reward = MathVerifyReward()


class OverlongPenalty:
    """DAPO's soft overlong penalty on the completion length in tokens (EOS included, as in verl)."""

    __name__ = "overlong_penalty"

    def __init__(self, max_completion_length: int, buffer_length: int, penalty_factor: float = 1.0):
        if not 0 < buffer_length <= max_completion_length:
            raise ValueError(f"overlong penalty: need 0 < buffer_length ({buffer_length}) <= max_completion_length "
                             f"({max_completion_length}).")
        if not _finite(penalty_factor) or penalty_factor <= 0:
            raise ValueError(f"overlong penalty: penalty_factor must be a finite number > 0 (official: 1.0), got "
                             f"{penalty_factor!r}; a negative one would reward overlong completions.")
        self.max_completion_length = max_completion_length
        self.buffer_length = buffer_length
        self.penalty_factor = penalty_factor

    def penalty(self, length: int) -> float:
        exceed = length - (self.max_completion_length - self.buffer_length)
        return min(-exceed / self.buffer_length * self.penalty_factor, 0.0)

    def __call__(self, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None or isinstance(completion_ids, (str, bytes)):
            raise TypeError("overlong_penalty needs `completion_ids`, a list of token-id sequences (TRL passes it); "
                            f"got {type(completion_ids).__name__}.")
        lengths = []
        for i, ids in enumerate(completion_ids):
            if ids is None or isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
                raise TypeError(f"overlong_penalty: completion_ids[{i}] is a {type(ids).__name__}; expected a "
                                "sequence of token ids.")
            lengths.append(len(ids))
        return [self.penalty(length) for length in lengths]


def overlong_penalty(max_completion_length: int = 20480, buffer_length: int = 4096,
                     penalty_factor: float = 1.0) -> OverlongPenalty:
    """The overlong-penalty reward function for a run. Official values: 32B 20480/4096, 7B 10240/2048, factor 1."""
    return OverlongPenalty(max_completion_length, buffer_length, penalty_factor)
