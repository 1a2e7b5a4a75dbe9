"""A tiny causal LM, its tokenizer and a toy task, built locally in a fraction of a second (no Hub access).

Private: the embedded default of ``fipo-trl train`` / ``fipo-trl eval`` (no model named), the examples and the
tests. The model is a 2-layer Llama (a Llama config keeps transformers from swapping in a Qwen2 BPE tokenizer on
reload) with a word-level tokenizer whose decoding round-trips exactly (WordPiece decoder with cleanup off).
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = (
    "the a an is are was of to and in on for with what how why who one two three four five six seven eight nine "
    "ten zero plus minus times equals answer question number sum add cat dog sun moon red blue green yes no hello "
    "world please compute give me short long story about tell write"
).split()
PUNCTUATION = list(".,?!:;+-*/=()'\"")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + ' <eos> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
NUMBER_WORDS = WORDS[WORDS.index("one"):WORDS.index("ten") + 1]


def build_tiny_tokenizer():
    """Word-level tokenizer over a ~90-token vocabulary, with a chat template and left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(dict.fromkeys(SPECIAL_TOKENS + WORDS + list("0123456789") + PUNCTUATION))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # cleanup=False: decode round-trips exactly
    tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"], chat_template=CHAT_TEMPLATE,
        padding_side="left", model_max_length=256,
        model_input_names=["input_ids", "attention_mask"],  # as Llama's tokenizers: no token_type_ids for generate
    )


def build_tiny_model(output_dir: str | Path, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised tiny Llama causal LM and its tokenizer to ``output_dir``; return the path.

    Load it back with ``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``,
    or pass the path as ``model=`` to FIPOTrainer/GRPOTrainer.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    output_dir = Path(output_dir)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def supervised_step(model, tokenizer, optimizer, pairs: list[tuple[str, str]]) -> float:
    """One plain supervised step on (prompt, target) texts: the target plus EOS, loss on the completion only (as in
    TRL's SFT), prompts left-padded (as TRL pads them for generation). Returns the loss; the warm starts of the
    examples' tasks are loops of this."""
    input_ids, labels = [], []
    for prompt, target in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        target_ids = tokenizer(target)["input_ids"] + [tokenizer.eos_token_id]
        input_ids.append(prompt_ids + target_ids)
        labels.append([-100] * len(prompt_ids) + target_ids)
    width = max(len(ids) for ids in input_ids)
    pad = tokenizer.pad_token_id
    batch_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in input_ids])
    batch_labels = torch.tensor([[-100] * (width - len(ids)) + ids for ids in labels])
    attention_mask = torch.arange(width)[None] >= torch.tensor([width - len(ids) for ids in input_ids])[:, None]
    loss = model(input_ids=batch_ids, attention_mask=attention_mask.long(), labels=batch_labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def tiny_prompt_dataset(n: int = 32, *, conversational: bool = False, seed: int = 0):
    """``n`` arithmetic prompts in the tiny vocabulary ("what is two plus three ?"), with an ``answer`` column."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    prompts, answers = [], []
    for _ in range(n):
        a, b = (int(x) for x in torch.randint(1, 5, (2,), generator=generator))
        prompts.append(f"what is {NUMBER_WORDS[a - 1]} plus {NUMBER_WORDS[b - 1]} ?")
        answers.append(str(a + b))
    if conversational:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    return Dataset.from_dict({"prompt": prompts, "answer": answers})


def completion_text(completion) -> str:
    """The text of a completion in either dataset format (a string, or a list of chat messages)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def digit_reward(completions, answer=None, **kwargs) -> list[float]:
    """Toy reward: 1 for containing the right digit, plus a small bonus per digit and a length penalty."""
    rewards = []
    for i, completion in enumerate(completions):
        words = completion_text(completion).split()
        digits = sum(w.isdigit() for w in words)
        correct = answer is not None and answer[i] in words
        rewards.append(float(correct) + 0.1 * digits - 0.02 * len(words))
    return rewards
