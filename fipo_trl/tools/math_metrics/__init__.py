"""The ``math_metrics`` evaluate metric (avg@k, pass@k, cons@k with math-verify), shipped inside fipo_trl.

    from fipo_trl.tools.math_metrics import load_math_metric
    metric = load_math_metric()          # = evaluate.load("<this folder>"): works offline
    metric.compute(predictions=[["\\boxed{4}", "\\boxed{5}"]], references=["4"])
"""

from pathlib import Path

METRIC_PATH = str(Path(__file__).resolve().parent)  # evaluate.load(folder) loads folder/math_metrics.py


def load_math_metric(**kwargs):
    import evaluate

    return evaluate.load(METRIC_PATH, **kwargs)


__all__ = ["METRIC_PATH", "load_math_metric"]
