"""The prompts of a training dataset, checked before the model loads: their format (text or chat messages, one for
the whole dataset), media parts a text-only model cannot read, and their length against the model's positions (an
error for a learned absolute table, which generation would index past; a warning for a rotary model, which degrades).
"""

from __future__ import annotations

import warnings


def _prompt_problem(prompt) -> tuple[str | None, str | None]:
    """(the prompt's kind, 'text' or 'chat', or None, and what is wrong with it, or None)."""
    if isinstance(prompt, str):
        return "text", None if prompt.strip() else "empty text"
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            return "chat", "an empty message list"
        for j, message in enumerate(prompt):
            if not isinstance(message, dict):
                return "chat", f"message {j} is a {type(message).__name__}, not a {{'role', 'content'}} dict"
            missing = [key for key in ("role", "content") if key not in message or message[key] is None]
            if missing:
                return "chat", f"message {j} has no {' or '.join(repr(k) for k in missing)} (keys: {sorted(message)})"
        return "chat", None
    return None, f"a {type(prompt).__name__} ({prompt!r:.40}), not text or a list of chat messages"


def check_prompts(prompts, what: str = "train_dataset") -> str | None:
    """Check every prompt: text or chat messages (each with 'role' and 'content'), not empty, and one format for
    the whole dataset (TRL decides the format from the first row). Returns the format, 'text' or 'chat'."""
    first_of_kind: dict[str, int] = {}
    try:
        for i, prompt in enumerate(prompts):
            kind, problem = _prompt_problem(prompt)
            if problem:
                raise ValueError(f"{what}: row {i}'s 'prompt': {problem}. Fix: give every row a non-empty prompt "
                                 "(a text, or a list of {'role': ..., 'content': ...} messages), or drop the row.")
            first_of_kind.setdefault(kind, i)
            if len(first_of_kind) > 1:
                raise ValueError(f"{what}: rows mix text prompts (row {first_of_kind['text']}) and chat-message "
                                 f"prompts (row {first_of_kind['chat']}); TRL formats every row like the first. Fix: "
                                 "use one format, e.g. wrap each text as [{'role': 'user', 'content': text}].")
    except UnicodeDecodeError as error:  # datasets decodes a JSON row lazily
        raise ValueError(f"{what}: a prompt is not UTF-8 text ({error}). Fix: re-save the data as UTF-8.") from None
    return next(iter(first_of_kind), None)


def absolute_position_limit(config) -> int | None:
    """The size of the model's learned absolute position table (GPT-2, OPT, ...), or None: rotary (RoPE) and ALiBi
    models have no table to index past, so no hard limit."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    settings = config.to_dict()
    if any("rope" in key or "rotary" in key or "alibi" in key for key in settings):
        return None
    if settings.get("position_embedding_type", "absolute") != "absolute":
        return None
    return limit


def rotary_position_limit(config) -> int | None:
    """The positions a rotary (RoPE) model was trained on (max_position_embeddings), or None for other models.
    Past them it still runs, so a longer prompt is a warning, not an error."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    settings = config.to_dict()
    return limit if any("rope" in key or "rotary" in key for key in settings) else None


def _prompt_tokens(prompt, tokenizer) -> int:
    if isinstance(prompt, str):
        return len(tokenizer(prompt)["input_ids"])
    return len(tokenizer.apply_chat_template(list(prompt), tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"])


def _surely_fits(prompt, room: int) -> bool:
    """Without tokenizing: a token is at least one UTF-8 byte (byte-level BPE, SentencePiece), so a prompt of fewer
    bytes than ``room`` (less room for the chat template's own tokens) fits."""
    texts = [prompt] if isinstance(prompt, str) else [str(m.get("content", "")) for m in prompt]
    return sum(len(text.encode("utf-8", errors="replace")) for text in texts) + 64 * len(texts) <= room


def warn_past_rotary_positions(prompts, tokenizer, limit: int, max_completion_length: int,
                               what: str = "train_dataset") -> None:
    """Warn, before the model loads, when prompts plus max_completion_length run past the positions a rotary model
    was trained on: it still computes, but its outputs degrade there."""
    room = limit - max_completion_length
    if room <= 0:  # the completions alone run past: no prompt needs tokenizing
        warnings.warn(
            f"{what}: max_completion_length {max_completion_length} alone runs past the {limit} positions the model "
            "was trained on (max_position_embeddings): long completions reach positions where a rotary model's "
            f"outputs degrade. Fix: lower max_completion_length below {limit}.", UserWarning, stacklevel=4)
        return
    over = [(i, n) for i, prompt in enumerate(prompts) if not _surely_fits(prompt, room)
            if (n := _prompt_tokens(prompt, tokenizer)) > room]
    if over:
        i, n = max(over, key=lambda item: item[1])
        warnings.warn(
            f"{what}: {len(over)} prompt(s) plus max_completion_length {max_completion_length} run past the "
            f"{limit} positions the model was trained on (max_position_embeddings; the longest is row {i}, {n} "
            "tokens). A rotary model still computes there, but its outputs degrade. Fix: shorten or drop the long "
            f"prompts, or lower max_completion_length.", UserWarning, stacklevel=4)


def check_content_parts(prompts, config, what: str = "train_dataset") -> None:
    """A chat message whose content is a list of parts with an image (or other media) needs a vision-language
    model: a text-only model's chat template fails on it, after the model has loaded."""
    if any(hasattr(config, key) for key in ("vision_config", "image_token_id", "image_token_index")):
        return
    for i, prompt in enumerate(prompts):
        for j, message in enumerate(prompt if isinstance(prompt, (list, tuple)) else ()):
            parts = message.get("content") if isinstance(message, dict) else None
            media = [p.get("type") for p in parts if isinstance(p, dict) and p.get("type") != "text"] \
                if isinstance(parts, list) else []
            if media:
                raise ValueError(
                    f"{what}: row {i}'s message {j} has content parts of type {media[0]!r}, which only a "
                    f"vision-language model reads; this model ({getattr(config, 'model_type', 'unknown')}) is "
                    "text-only. Fix: keep the text parts as the message's content (a string), or train a "
                    "vision-language model.")


def check_prompt_lengths(prompts, tokenizer, limit: int, max_completion_length: int,
                         what: str = "train_dataset") -> None:
    """Each prompt plus max_completion_length tokens must fit the model's absolute position table, or generation
    fails with an IndexError inside the embedding."""
    for i, prompt in enumerate(prompts):
        n = _prompt_tokens(prompt, tokenizer)
        if n + max_completion_length > limit:
            raise ValueError(
                f"{what}: row {i}'s prompt is {n} tokens; with max_completion_length {max_completion_length} that is "
                f"{n + max_completion_length} positions, but the model's position table has {limit} "
                "(max_position_embeddings). Fix: shorten or drop the long prompts, or lower max_completion_length "
                f"to at most {max(limit - n, 0)}.")
