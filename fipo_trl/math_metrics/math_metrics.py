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

import datasets
import evaluate

from fipo_trl.rewards import MathVerifier, extract_answer

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
    predictions: for each problem, the list of its n sampled completions (text).
    references: for each problem, the reference answer (text, boxed or not).
    k: int or list of ints, the k of pass@k and cons@k (each <= n). Default: [1, n].
    timeout_seconds: hard limit of one math-verify check. Default 5.
    max_answer_chars: longer answers count as no answer. Default 1000.
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


def score_problems(predictions, references, ks, verifier: MathVerifier, max_answer_chars: int) -> dict:
    n = len(predictions[0])
    if any(len(samples) != n for samples in predictions):
        raise ValueError("Every problem needs the same number of samples.")
    for k in ks:
        if not 0 < k <= n:
            raise ValueError(f"k={k} is not in [1, n={n}].")
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

    def _compute(self, predictions, references, k=None, timeout_seconds: float = 5.0, max_answer_chars: int = 1000):
        if not predictions:
            raise ValueError("No problems to score.")
        n = len(predictions[0])
        ks = sorted({1, n}) if k is None else sorted({k} if isinstance(k, int) else set(k))
        verifier = MathVerifier(timeout_seconds)
        try:
            return score_problems(predictions, references, ks, verifier, max_answer_chars)
        finally:
            verifier.close()
