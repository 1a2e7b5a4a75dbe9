"""Token-influence view: which tokens FIPO credits, as an HTML page of completions shaded by their weight f.

It reads the weights the trainer already computed for its last micro-batch (``FIPOTrainer.fipo_last_batch``), so it
costs no forward pass. Orange = f > 1 (the token's future is being made more likely: more credit, positive or
negative), blue = f < 1 (two-sided clipping only), white = 1. Hovering a token shows f and the Future-KL F.
"""

from __future__ import annotations

import html
import html.parser
import os

import torch
from transformers import TrainerCallback

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>FIPO token influence, step {step}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; }}
.completion {{ margin: 1em 0; padding: .6em; border: 1px solid #ddd; border-radius: 4px; line-height: 1.9; }}
.meta {{ color: #555; font-size: .85em; margin-bottom: .3em; }}
.tok {{ padding: 1px 2px; border-radius: 2px; white-space: pre-wrap; unicode-bidi: isolate; }}
.ctl {{ color: #a00; font-size: .75em; }}
</style></head><body>
<h1>FIPO token influence, step {step}</h1>
<p>Each completion token is shaded by its influence weight f = clip(exp(F)) in [{lower:g}, {upper:g}]:
orange for f &gt; 1, blue for f &lt; 1. Hover a token for f and its Future-KL F.</p>
{rows}
</body></html>
"""


def _shade(weight: float, lower: float, upper: float) -> str:
    if weight > 1 and upper > 1:
        return f"rgba(255, 140, 0, {min(1.0, (weight - 1) / (upper - 1)) * 0.85:.3f})"
    if weight < 1 and lower < 1:
        return f"rgba(30, 110, 255, {min(1.0, (1 - weight) / (1 - lower)) * 0.85:.3f})"
    return "rgba(0, 0, 0, 0)"


# Unicode direction controls (embeddings, overrides, isolates, marks). A model can emit them, and inside the page one
# would reorder every token after it; each span is a bidi isolate, and the controls are shown as visible code points.
_BIDI_CONTROLS = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)}


def _token_html(text: str) -> str:
    return "".join(f'<span class="ctl">&lt;U+{ord(ch):04X}&gt;</span>' if ch in _BIDI_CONTROLS else html.escape(ch)
                   for ch in text)


def render_influence_html(batch: dict[str, torch.Tensor], tokenizer, *, step: int, lower: float, upper: float,
                          max_completions: int = 8) -> str:
    """HTML for up to ``max_completions`` rows of a weighted micro-batch: one span per completion token."""
    rows = []
    for row in range(min(max_completions, batch["completion_ids"].shape[0])):
        mask = batch["mask"][row]
        ids = batch["completion_ids"][row][mask].tolist()
        weights = batch["weights"][row][mask].tolist()
        future_kl = batch["future_kl"][row][mask].tolist()
        advantage = batch["advantages"][row].float().mean().item()
        spans = "".join(
            f'<span class="tok" style="background:{_shade(w, lower, upper)}" data-weight="{w!r}" '
            f'data-future-kl="{f!r}" title="f={w:.4f} F={f:.4f}">{_token_html(tokenizer.decode([token]))}</span>'
            for token, w, f in zip(ids, weights, future_kl)
        )
        kept = "" if bool(batch["keep"][row]) else " · dropped by the sequence filter"
        rows.append(f'<div class="completion"><div class="meta">completion {row} · advantage {advantage:+.3f}'
                    f' · {len(ids)} tokens{kept}</div>{spans}</div>')
    return PAGE.format(step=step, lower=lower, upper=upper, rows="\n".join(rows))


class TokenInfluenceCallback(TrainerCallback):
    """Every ``every_n_steps`` optimizer steps, writes ``<output_dir>/fipo_influence/step-<N>.html`` and
    ``latest.html`` for the trainer's last micro-batch; also logs the page to wandb (``wandb.Html``) or
    TensorBoard (as text) when those are in ``report_to``.

        trainer.add_callback(TokenInfluenceCallback(trainer, every_n_steps=10))
    """

    def __init__(self, trainer, every_n_steps: int = 10, max_completions: int = 8, subdir: str = "fipo_influence"):
        if every_n_steps < 1:
            raise ValueError(f"`every_n_steps` = {every_n_steps} is invalid: it must be >= 1.")
        self.trainer, self.every_n_steps, self.max_completions, self.subdir = (
            trainer, every_n_steps, max_completions, subdir)
        self.written: list[str] = []

    def on_step_end(self, args, state, control, **kwargs):
        batch = self.trainer.fipo_last_batch
        if state.global_step % self.every_n_steps or not state.is_world_process_zero or batch is None:
            return
        from fipo_trl.kernels.common import weight_bounds

        lower, upper = weight_bounds(args.fipo_clip_ratio, args.fipo_clip_high_only)
        page = render_influence_html(batch, self.trainer.processing_class, step=state.global_step, lower=lower,
                                     upper=upper, max_completions=self.max_completions)
        folder = os.path.join(args.output_dir, self.subdir)
        os.makedirs(folder, exist_ok=True)
        for name in (f"step-{state.global_step}.html", "latest.html"):
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(page)
        self.written.append(os.path.join(folder, f"step-{state.global_step}.html"))
        self._log_to_trackers(args, state, page)

    def _log_to_trackers(self, args, state, page: str) -> None:
        report_to = args.report_to or []
        if "wandb" in report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({"fipo/token_influence": wandb.Html(page)}, step=state.global_step)
        if "tensorboard" in report_to:
            for callback in self.trainer.callback_handler.callbacks:
                writer = getattr(callback, "tb_writer", None)
                if writer is not None:
                    writer.add_text("fipo/token_influence", page, state.global_step)


def read_influence_html(page: str) -> list[list[tuple[float, float, str]]]:
    """The inverse of ``render_influence_html``: per completion, (f, F, CSS style) of every token span, e.g. to
    check a page against the weights a trainer computed."""

    class _Spans(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows: list[list[tuple[float, float, str]]] = []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "div" and attrs.get("class") == "completion":
                self.rows.append([])
            elif tag == "span" and attrs.get("class") == "tok":
                self.rows[-1].append((float(attrs["data-weight"]), float(attrs["data-future-kl"]), attrs["style"]))

    parser = _Spans()
    parser.feed(page)
    return parser.rows
