"""Learning-curve plots of FIPO (and DAPO) runs from ``trainer.state.log_history``: reward, completion length and
FIPO weight statistics vs optimizer step, as mean +- band over seeds.

matplotlib is an optional extra: ``pip install 'fipo_trl[demo]'``. It is drawn with the Agg canvas directly, so
nothing touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import math
import os

from transformers import TrainerCallback

from fipo_trl.tools.model_card import CURVES_IMAGE

# (log key, panel title). Rewards and lengths are logged once per generation batch, the FIPO statistics per
# logging step; DAPO runs have no fipo/ keys and are left out of those panels.
PANELS = [
    ("reward", "reward (sampled, T=1)"),
    ("completions/mean_length", "completion length (tokens)"),
    ("fipo/influence_weights_mean", "FIPO weight f: mean"),
    ("fipo/IW_upper_clip_ratio", "FIPO weight f: fraction at upper clip"),
]


def require_matplotlib():
    """Import matplotlib's Agg canvas, or fail with the extra to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("Plotting training curves needs matplotlib, which fipo_trl does not install by default. "
                          "Install the demo extra: pip install 'fipo_trl[demo]' (or pip install matplotlib)."
                          ) from error
    return Figure, FigureCanvasAgg


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every log entry that holds ``key``."""
    points = [(entry["step"], float(entry[key])) for entry in log_history if isinstance(entry.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: sampled rewards of one generation batch are noisy."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _mean_band(runs: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean and mean +- std over runs, on the steps every run logged."""
    common = sorted(set.intersection(*(set(steps) for steps, _ in runs)))
    lookup = [dict(zip(steps, values)) for steps, values in runs]
    mean, low, high = [], [], []
    for step in common:
        values = [table[step] for table in lookup]
        m = sum(values) / len(values)
        std = math.sqrt(sum((v - m) ** 2 for v in values) / len(values))
        mean.append(m)
        low.append(m - std)
        high.append(m + std)
    return common, mean, low, high


def plot_training_curves(runs: dict[str, list[list[dict]]], path: str, *, title: str | None = None,
                         smooth: int = 1, dpi: int = 90, panels: list[tuple[str, str]] = PANELS) -> str:
    """Write a PNG of reward, completion length and FIPO weight statistics vs optimizer step.

    runs: ``{label: [log_history of seed 1, log_history of seed 2, ...]}``; with several histories per label the
    line is their mean and the band mean +- std. ``smooth`` averages each run over that many logged points first.
    ``panels``: ``[(log key, title), ...]``, one panel each (default: reward, length and the FIPO weight).
    """
    Figure, FigureCanvasAgg = require_matplotlib()
    figure = Figure(figsize=(4 * len(panels), 3.4), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels))
    colors = ["tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    for (key, panel_title), axis in zip(panels, axes):
        for (label, histories), color in zip(runs.items(), colors):
            per_run = [series(history, key) for history in histories]
            per_run = [(steps, _smooth(values, smooth)) for steps, values in per_run if steps]
            if not per_run:
                continue  # e.g. DAPO has no FIPO weights
            steps, mean, low, high = _mean_band(per_run)
            seeds = f" ({len(per_run)} seeds)" if len(per_run) > 1 else ""
            axis.plot(steps, mean, color=color, label=label + seeds, linewidth=1.5)
            if len(per_run) > 1:
                axis.fill_between(steps, low, high, color=color, alpha=0.25, linewidth=0)
        axis.set_title(panel_title, fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=11)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path)
    return path


class TrainingCurvesCallback(TrainerCallback):
    """Writes ``<output_dir>/training_curves.png`` (``fipo_trl.tools.model_card.CURVES_IMAGE``, which the FIPO model
    card links) before each checkpoint's model card is written and at the end of training.

        trainer.add_callback(TrainingCurvesCallback(label="FIPO"))
    """

    def __init__(self, label: str = "FIPO", smooth: int = 1):
        require_matplotlib()  # fail at setup, not after an hour of training
        self.label, self.smooth = label, smooth
        self.path: str | None = None

    def _write(self, args, state) -> None:
        if state.is_world_process_zero and state.log_history:
            self.path = plot_training_curves({self.label: [state.log_history]},
                                             os.path.join(args.output_dir, CURVES_IMAGE), smooth=self.smooth)

    def on_log(self, args, state, control, **kwargs):
        # Logging runs before saving within a step, so the checkpoint's model card finds a current image.
        if control.should_save:
            self._write(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(args, state)
