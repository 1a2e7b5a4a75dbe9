"""Trainer callbacks for FIPO runs."""

from __future__ import annotations

from transformers import TrainerCallback

# The metrics worth a glance at every logging step; the full set is in the logs under fipo/.
COMPACT_METRICS = {
    "loss": "loss",
    "reward": "reward",
    "fipo/influence_weights_mean": "f_mean",
    "fipo/influence_weights_max": "f_max",
    "fipo/IW_upper_clip_ratio": "f_at_cap",
    "fipo/future_kl_mean": "F_mean",
    "fipo/active": "active",
    "fipo/dropped_seq_ratio": "dropped",
}


class PrintFIPOMetricsCallback(TrainerCallback):
    """Prints one compact line of FIPO metrics per logging step (main process only)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "fipo/active" not in logs:
            return
        parts = [f"{short}={logs[key]:.4g}" for key, short in COMPACT_METRICS.items()
                 if isinstance(logs.get(key), (int, float))]
        print(f"[fipo] step {state.global_step}: " + " ".join(parts), flush=True)
