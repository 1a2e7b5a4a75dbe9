"""Token-influence view: which tokens FIPO credits, as an HTML page of completions shaded by their weight f.

It reads the weights the trainer already computed for its last micro-batch (``FIPOTrainer.fipo_last_batch``), so it
costs no forward pass. Orange = f > 1 (the token's future is being made more likely: more credit, positive or
negative), blue = f < 1 (two-sided clipping only), white = 1. Hovering a token shows f and the Future-KL F.
"""

from __future__ import annotations

import html
import json
import os

import torch
from transformers import TrainerCallback

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>FIPO token influence, step {step}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; }}
.completion {{ margin: 1em 0; padding: .6em; border: 1px solid #ddd; border-radius: 4px; line-height: 1.9; }}
.meta {{ color: #555; font-size: .85em; margin-bottom: .3em; }}
.prompt {{ color: #333; background: #f4f4f4; padding: .2em .5em; margin-bottom: .3em; border-radius: 3px;
  font-size: .9em; white-space: pre-wrap; unicode-bidi: isolate; }}
.label {{ color: #777; font-size: .8em; margin-right: .4em; }}
/* inline-block: a line may break between any two tokens, also where a token carries no space */
.tok {{ display: inline-block; padding: 1px 2px; margin: 1px 0; border-radius: 2px; white-space: pre-wrap;
  unicode-bidi: isolate; }}
.ctl {{ color: #a00; font-size: .75em; }}
.scale {{ display: inline-flex; align-items: center; gap: 0; margin: .3em 0 1em; font-size: .8em; }}
.swatch {{ display: inline-block; width: 3.2em; text-align: center; padding: 2px 0; border: 1px solid #eee; }}
</style></head><body>
<h1>FIPO token influence, step {step}</h1>
<p>Each completion token is shaded by its influence weight f = clip(exp(F)) in [{lower:g}, {upper:g}]:
orange for f &gt; 1 (its future became more likely under the updated policy: more credit, for a positive or a
negative advantage), {below}white for 1. Hover a token for f and its Future-KL F.</p>
<div class="scale"><span class="label">f</span>{scale}</div>
{rows}
</body></html>
"""


def _shade(weight: float, lower: float, upper: float) -> str:
    if weight > 1 and upper > 1:
        return f"rgba(255, 140, 0, {min(1.0, (weight - 1) / (upper - 1)) * 0.85:.3f})"
    if weight < 1 and lower < 1:
        return f"rgba(30, 110, 255, {min(1.0, (1 - weight) / (1 - lower)) * 0.85:.3f})"
    return "rgba(0, 0, 0, 0)"


def _colour_scale(lower: float, upper: float, swatches: int = 5) -> str:
    """Swatches from ``lower`` (or 1 when the weight is never below 1) to ``upper``, each in its own colour."""
    low = min(lower, 1.0)
    values = sorted({*(low + (1 - low) * i / (swatches - 1) for i in range(swatches)),
                     *(1 + (upper - 1) * i / (swatches - 1) for i in range(swatches))})
    return "".join(f'<span class="swatch" style="background:{_shade(v, lower, upper)}">{v:.2f}</span>'
                   for v in values)


# Unicode direction controls (embeddings, overrides, isolates, marks). A model can emit them, and inside the page one
# would reorder every token after it; each span is a bidi isolate, and the controls are shown as visible code points.
_BIDI_CONTROLS = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)}


def _token_html(text: str) -> str:
    return "".join(f'<span class="ctl">&lt;U+{ord(ch):04X}&gt;</span>' if ch in _BIDI_CONTROLS else html.escape(ch)
                   for ch in text)


def _context_html(context: dict | None) -> tuple[str, str]:
    """(meta text, prompt block) for one row's context: reward per function, total, reference answer, prompt."""
    if not context:
        return "", ""
    meta = ""
    if context.get("reward") is not None:
        meta += f" · reward {context['reward']:+.3g}"
        parts = [f"{_token_html(name)} {value:+.3g}" for name, value in (context.get("rewards") or {}).items()
                 if value == value]  # skip functions that did not score this row (NaN)
        if len(parts) > 1:
            meta += " (" + ", ".join(parts) + ")"
    if context.get("reference") is not None:
        meta += f' · reference <b>{_token_html(str(context["reference"]))}</b>'
    prompt = context.get("prompt")
    block = f'<div class="prompt"><span class="label">prompt</span>{_token_html(prompt)}</div>' if prompt else ""
    return meta, block


def render_influence_html(batch: dict[str, torch.Tensor], tokenizer, *, step: int, lower: float, upper: float,
                          max_completions: int = 8, context: list[dict] | None = None,
                          longest_first: bool = False) -> str:
    """HTML for up to ``max_completions`` rows of a weighted micro-batch: the prompt, reward and reference answer
    (from ``context``, one dict per row with optional keys ``prompt``, ``reward``, ``rewards`` (per function) and
    ``reference``; else the prompt is decoded from ``prompt_ids`` when the batch has them), then one shaded span per
    completion token. ``longest_first`` shows the longest completions."""
    rows = []
    order = list(range(batch["completion_ids"].shape[0]))
    if longest_first:
        order.sort(key=lambda row: -int(batch["mask"][row].sum()))
    for row in order[:max_completions]:
        mask = batch["mask"][row]
        ids = batch["completion_ids"][row][mask].tolist()
        weights = batch["weights"][row][mask].tolist()
        future_kl = batch["future_kl"][row][mask].tolist()
        advantage = batch["advantages"][row].float().mean().item()
        row_context = dict(context[row]) if context else {}
        if "prompt" not in row_context and "prompt_ids" in batch:
            prompt_ids = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()].tolist()
            row_context["prompt"] = tokenizer.decode(prompt_ids, skip_special_tokens=True)
        meta, prompt_block = _context_html(row_context)
        spans = "".join(
            f'<span class="tok" style="background:{_shade(w, lower, upper)}" data-weight="{w!r}" '
            f'data-future-kl="{f!r}" title="f={w:.4f} F={f:.4f}">{_token_html(tokenizer.decode([token]))}</span>'
            for token, w, f in zip(ids, weights, future_kl)
        )
        kept = "" if bool(batch["keep"][row]) else " · dropped by the sequence filter"
        rows.append(f'<div class="completion"><div class="meta">completion {row}{meta} · advantage {advantage:+.3f}'
                    f' · {len(ids)} tokens{kept}</div>{prompt_block}<span class="label">completion</span>{spans}'
                    '</div>')
    below = "blue for f &lt; 1, " if lower < 1 else "(the one-sided clip never gives f &lt; 1), "
    return PAGE.format(step=step, lower=lower, upper=upper, rows="\n".join(rows), scale=_colour_scale(lower, upper),
                       below=below)


REFERENCE_COLUMNS = ("answer", "solution", "reference", "ground_truth", "target")


def _prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, default=str)


def _completion_text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def batch_context(trainer, batch: dict[str, torch.Tensor], references: dict | None = None) -> list[dict]:
    """Per row of the trainer's last weighted micro-batch: its prompt, rewards and reference answer.

    TRL logs each generation batch's prompts, completions, per-function rewards and advantages
    (``GRPOTrainer._logs``); a row is found there by its decoded completion and its advantage. The reference comes
    from ``references`` (``{prompt: reference}``) when given. A row not found gets an empty context.
    """
    logs = getattr(trainer, "_logs", None) or {}
    prompts, completions = list(logs.get("prompt", [])), list(logs.get("completion", []))
    advantages = list(logs.get("advantages", []))
    per_function = {name: list(values) for name, values in logs.get("rewards", {}).items()}
    weights = dict(zip(per_function, trainer.reward_weights.tolist())) if hasattr(trainer, "reward_weights") else {}
    index = {}
    for i, (completion, advantage) in enumerate(zip(completions, advantages)):
        index.setdefault((_completion_text(completion), round(float(advantage), 4)), i)
    decoded = trainer.processing_class.batch_decode(
        [ids[mask].tolist() for ids, mask in zip(batch["completion_ids"], batch["mask"])], skip_special_tokens=True)
    rows = []
    for text, advantage in zip(decoded, batch["advantages"].float().reshape(len(decoded), -1)[:, 0].tolist()):
        i = index.get((text, round(advantage, 4)))
        if i is None:
            rows.append({})
            continue
        rewards = {name: float(values[i]) for name, values in per_function.items()}
        total = sum(weights.get(name, 1.0) * value for name, value in rewards.items() if value == value)
        prompt = prompts[i] if i < len(prompts) else None
        row = {"rewards": rewards, "reward": total}
        if isinstance(prompt, str):
            row["prompt"] = prompt
        elif prompt:
            row["prompt"] = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)
        if references is not None and prompt is not None:
            row["reference"] = references.get(_prompt_key(prompt))
        rows.append(row)
    return rows


def references_by_prompt(dataset, column: str | None) -> dict | None:
    """``{prompt: reference answer}`` from a dataset's ``column`` (or the first of ``REFERENCE_COLUMNS`` it has)."""
    names = getattr(dataset, "column_names", None) or []
    column = column or next((name for name in REFERENCE_COLUMNS if name in names), None)
    if column is None or column not in names or "prompt" not in names:
        return None
    return {_prompt_key(p): r for p, r in zip(dataset["prompt"], dataset[column])}


class TokenInfluenceCallback(TrainerCallback):
    """Every ``every_n_steps`` optimizer steps, writes ``<output_dir>/fipo_influence/step-<N>.html`` and
    ``latest.html`` for the trainer's last micro-batch; also logs the page to wandb (``wandb.Html``) or
    TensorBoard (as text) when those are in ``report_to``.

        trainer.add_callback(TokenInfluenceCallback(trainer, every_n_steps=10))

    Each completion comes with its prompt, its rewards (total and per function) and its reference answer, read from
    ``reference_column`` of the training dataset (default: the first of ``REFERENCE_COLUMNS`` it has).
    ``longest_first`` shows the longest completions of the micro-batch.
    """

    def __init__(self, trainer, every_n_steps: int = 10, max_completions: int = 8, subdir: str = "fipo_influence",
                 reference_column: str | None = None, longest_first: bool = False):
        if every_n_steps < 1:
            raise ValueError(f"`every_n_steps` = {every_n_steps} is invalid: it must be >= 1.")
        self.trainer, self.every_n_steps, self.max_completions, self.subdir = (
            trainer, every_n_steps, max_completions, subdir)
        self.reference_column, self.longest_first = reference_column, longest_first
        self._references: dict | None = None
        self.written: list[str] = []

    def on_step_end(self, args, state, control, **kwargs):
        batch = self.trainer.fipo_last_batch
        if state.global_step % self.every_n_steps or not state.is_world_process_zero or batch is None:
            return
        from fipo_trl.kernels.common import weight_bounds

        if self._references is None:  # once: a prompt -> reference lookup over the training dataset
            self._references = references_by_prompt(self.trainer.train_dataset, self.reference_column) or {}
        lower, upper = weight_bounds(args.fipo_clip_ratio, args.fipo_clip_high_only)
        context = batch_context(self.trainer, batch, references=self._references or None)
        page = render_influence_html(batch, self.trainer.processing_class, step=state.global_step, lower=lower,
                                     upper=upper, max_completions=self.max_completions, context=context,
                                     longest_first=self.longest_first)
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
