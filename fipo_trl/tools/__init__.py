"""The tools around the method: the ``fipo-trl`` command (cli.py), evaluation (evaluation.py, math_metrics/), the
model card (model_card.py), the token-influence page (influence.py), training plots and console metrics (plots.py,
callbacks.py), and the tiny offline model of the demos and tests (tiny.py)."""
