"""avg@k, pass@k and cons@k for math answers, as an `evaluate` metric (load with evaluate.load(<this folder>)).

Each problem has n sampled completions and one reference answer. A completion's answer is its last ``\\boxed{}``
(else its last ``Answer:`` line); it is correct when math-verify finds it equivalent to the reference (each check in
a worker process under a hard time limit, see fipo_trl.rewards).

* ``avg@n``: mean correctness over all n samples of all problems (the paper's AIME "avg@32").
* ``pass@k``: the unbiased estimator 1 - C(n - c, k) / C(n, k) per problem (c correct of n), averaged (Chen et al.
  2021). Needs k <= n.
* ``cons@k``: majority vote over the first k samples: answers are grouped by math-verify equivalence, the largest group
  wins (ties: the group seen first), and the problem counts as solved when that group's answer is correct. Samples
  without an answer do not vote; a problem with no answers at all is unsolved.
"""

from __future__ import annotations

from math import comb
from numbers import Real

import datasets
import evaluate

from fipo_trl.rewards import MathVerifier, extract_answer
from fipo_trl.safety.inputs import is_int

_CITATION = """\
@article{chen2021codex,
  title={Evaluating Large Language Models Trained on Code},
  author={Chen, Mark and others},
  journal={arXiv preprint arXiv:2107.03374},
  year={2021}
}
"""

_KWARGS = """
Args:
    predictions: for each problem, the list of its n sampled completions (text; None or "" counts as wrong). Every
        problem needs the same n >= 1.
    references: for each problem, the reference answer (text, boxed or not; an int or float is turned into text).
    k: int or list of ints, the k of pass@k and cons@k (each in [1, n]). Default: [1, n].
    timeout_seconds: hard limit of one math-verify check (> 0). Default 5.
    max_answer_chars: longer answers count as no answer (>= 1). Default 1000.
Bad inputs raise ValueError naming the argument (and the problem index) and the fix.
Returns:
    {"avg@n": float, "pass@k": float, "cons@k": float (for each k), "num_problems": int, "num_samples": n,
     "correct_counts": per-problem number of correct samples}
"""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from n samples with c correct: 1 - C(n - c, k) / C(n, k)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}.")
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def majority_vote(answers: list[str | None], correct: list[bool], equal) -> bool:
    """Whether the most common answer (grouping answers with ``equal``) is correct; None answers do not vote."""
    clusters: list[list[int]] = []  # sample indices; the first one represents the cluster
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        for cluster in clusters:
            representative = answers[cluster[0]]
            if answer == representative or equal(representative, answer):
                cluster.append(i)
                break
        else:
            clusters.append([i])
    if not clusters:
        return False
    winner = max(clusters, key=len)  # max keeps the first of equal-sized clusters
    return correct[winner[0]]


def check_inputs(predictions, references) -> tuple[list[list[str]], list[str]]:
    """Validated copies of ``predictions`` and ``references``, or a ValueError that names the bad entry and the fix.
    A None completion becomes "" (scored as wrong, like any completion without an answer); a numeric reference
    (AIME answers often are ints) becomes text."""
    shape = "predictions=[['\\boxed{4}', '\\boxed{5}'], ...] (one list of n sampled completions per problem)"
    if predictions is None or isinstance(predictions, (str, bytes)) or not hasattr(predictions, "__len__"):
        raise ValueError(f"predictions must be a list with one entry per problem, got {type(predictions).__name__}."
                         f" Expected {shape}.")
    if references is None or isinstance(references, (str, bytes)) or not hasattr(references, "__len__"):
        raise ValueError(f"references must be a list with one reference answer per problem, got "
                         f"{type(references).__name__}.")
    if len(predictions) == 0:
        raise ValueError(f"predictions is empty: nothing to score. Expected {shape}.")
    if len(predictions) != len(references):
        raise ValueError(f"predictions has {len(predictions)} problems but references has {len(references)}: pass "
                         "exactly one reference answer per problem.")
    clean_predictions = []
    for i, samples in enumerate(predictions):
        if isinstance(samples, (str, bytes)) or not isinstance(samples, (list, tuple)):
            raise ValueError(f"predictions[{i}] is of type {type(samples).__name__}, not a list of completions. "
                             f"Expected {shape}.")
        if not samples:
            raise ValueError(f"predictions[{i}] has no completions: every problem needs n >= 1 samples.")
        texts = []
        for j, text in enumerate(samples):
            if text is not None and not isinstance(text, str):
                raise ValueError(f"predictions[{i}][{j}] is {text!r:.60} (type {type(text).__name__}), not the text "
                                 "of a completion. Pass the decoded completions (None counts as a wrong answer).")
            texts.append(text or "")
        clean_predictions.append(texts)
    clean_references = []
    for i, reference in enumerate(references):
        if isinstance(reference, Real) and not isinstance(reference, bool):
            reference = str(reference)
        if not isinstance(reference, str):
            raise ValueError(f"references[{i}] is {reference!r:.60} ({type(reference).__name__}): every problem needs "
                             "its reference answer as text (or a number).")
        if not reference.strip():
            raise ValueError(f"references[{i}] is empty: every problem needs a reference answer to score against.")
        clean_references.append(reference)
    return clean_predictions, clean_references


def check_ks(k, n: int) -> list[int]:
    """The sorted k values of pass@k / cons@k, each an integer in [1, n]; default [1, n]."""
    values = [1, n] if k is None else (list(k) if isinstance(k, (list, tuple, set)) else [k])
    if not values:
        raise ValueError(f"k is empty: pass an integer or a list of integers in [1, n={n}], or leave k unset for "
                         f"[1, {n}].")
    for value in values:
        if not is_int(value):
            raise ValueError(f"k must be an integer or a list of integers in [1, n={n}], got {value!r}.")
        if value < 1:
            raise ValueError(f"k={value} is below 1: pass@k and cons@k need k in [1, n={n}].")
        if value > n:
            raise ValueError(f"k={value} is larger than the n={n} samples per problem: pass@k and cons@k need k <= "
                             "n. Sample more completions per problem, or lower k.")
    return sorted({int(value) for value in values})


def score_problems(predictions, references, k, verifier: MathVerifier, max_answer_chars: int) -> dict:
    """Scores of validated inputs (see check_inputs); ``k`` as in the metric (None, an int or a list)."""
    n = len(predictions[0])
    for i, samples in enumerate(predictions):
        if len(samples) != n or not samples:
            raise ValueError(f"predictions[{i}] has {len(samples)} completions but predictions[0] has {n}: every "
                             "problem needs the same number n of samples.")
    ks = check_ks(k, n)
    counts, votes = [], {k: [] for k in ks}
    for samples, reference in zip(predictions, references):
        answers = [extract_answer(text, max_answer_chars) for text in samples]
        correct = [a is not None and verifier.equal(reference, a) for a in answers]
        counts.append(sum(correct))
        for k in ks:
            votes[k].append(majority_vote(answers[:k], correct[:k], verifier.equal))
    num = len(predictions)
    result = {f"avg@{n}": sum(counts) / (n * num)}
    for k in ks:
        result[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in counts) / num
        result[f"cons@{k}"] = sum(votes[k]) / num
    result.update(num_problems=num, num_samples=n, correct_counts=counts)
    return result


class MathMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")),
                                        "references": datasets.Value("string")}),
        )

    # Inputs are checked before evaluate encodes them, so a bad one is reported by name instead of as a generic
    # format error, and None completions / numeric references get their defined meaning.
    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of problems (their completions and reference answers), checked by ``check_inputs``."""
        if predictions is not None or references is not None:
            predictions, references = check_inputs(predictions, references)
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one problem (its completions and reference answer), checked by ``check_inputs``."""
        if prediction is not None or reference is not None:
            (prediction,), (reference,) = check_inputs([prediction], [reference])
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(self, predictions, references, k=None, timeout_seconds: float = 5.0, max_answer_chars: int = 1000):
        if not predictions:
            raise ValueError("predictions is empty: nothing to score.")
        if not isinstance(timeout_seconds, Real) or isinstance(timeout_seconds, bool) or not timeout_seconds > 0:
            raise ValueError(f"timeout_seconds must be a number > 0, got {timeout_seconds!r}.")
        if not is_int(max_answer_chars) or max_answer_chars < 1:
            raise ValueError(f"max_answer_chars must be an integer >= 1, got {max_answer_chars!r}.")
        verifier = MathVerifier(timeout_seconds)
        try:
            return score_problems(predictions, references, k, verifier, max_answer_chars)
        finally:
            verifier.close()
