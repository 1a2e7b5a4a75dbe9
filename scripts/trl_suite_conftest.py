"""conftest.py for TRL's GRPO test file run offline (copied next to it by scripts/trl_grpo_suite.py).

TRL's tests load the `trl-internal-testing/zen` dataset and two tiny Qwen2 models from the Hub. Here the dataset is
built by TRL's own `scripts/generate_zen_dataset.py` (its `push_to_hub` intercepted), and the two models are built
locally (random weights, as on the Hub, but a 400-token byte-level BPE tokenizer instead of Qwen2.5's 151k one) and
served under their Hub ids from a private HF cache. Tests that need other Hub models fail in both arms alike.
"""

import hashlib
import importlib
import importlib.resources
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

CACHE = Path(tempfile.mkdtemp(prefix="fake-hf-"))
os.environ["HF_HUB_CACHE"] = str(CACHE / "hub")
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

import datasets  # noqa: E402
import pytest  # noqa: E402
import trl  # noqa: E402

trl_import_utils = importlib.import_module("trl.import_utils")  # trl's lazy module hides it as an attribute

SUITE = Path(__file__).resolve().parents[1]  # holds generate_zen_dataset.py
ZEN_ID = "trl-internal-testing/zen"
MODEL_IDS = ("tiny-Qwen2ForCausalLM-2.5", "tiny-Qwen2ForSequenceClassification-2.5")

# Newer TRL releases dropped helpers that older test files still import from trl.import_utils.
if not hasattr(trl_import_utils, "is_joblib_available"):
    trl_import_utils.is_joblib_available = lambda: importlib.util.find_spec("joblib") is not None

# TRL's GRPOConfig defaults to bf16=True, which transformers refuses on a CPU-only machine (TRL's CI has GPUs).
# FIPOConfig already follows the hardware; this gives plain TRL the same default, so the two arms run alike.
_grpo_post_init = trl.GRPOConfig.__post_init__


def _cpu_post_init(self):
    if self.bf16 is None and not self.fp16:
        self.bf16 = False
    _grpo_post_init(self)


trl.GRPOConfig.__post_init__ = _cpu_post_init


def _build_zen():
    """Every zen config, as TRL's generator builds it: {config_name: DatasetDict}."""
    built = {}
    push = datasets.DatasetDict.push_to_hub

    def keep(self, repo_id, config_name="default", **kwargs):
        built[config_name] = self

    datasets.DatasetDict.push_to_hub = keep
    try:
        sys.path.insert(0, str(SUITE))
        import generate_zen_dataset

        generate_zen_dataset.main(test_size=0.1, push_to_hub=True, repo_id=ZEN_ID)
    finally:
        datasets.DatasetDict.push_to_hub = push
        sys.path.remove(str(SUITE))
    return built


ZEN = _build_zen()


def offline_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
    if path != ZEN_ID or name not in ZEN:
        raise FileNotFoundError(f"offline suite: {path!r} (config {name!r}) is not built locally")
    data = ZEN[name]
    if split is not None:
        return data[split].to_iterable_dataset() if streaming else data[split]
    if streaming:
        return datasets.IterableDatasetDict({key: value.to_iterable_dataset() for key, value in data.items()})
    return data


def _build_models():
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2ForSequenceClassification,
    )

    torch.manual_seed(0)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [text for dataset in ZEN.values() for split in dataset.values() for column in split.column_names
             for text in split[column] if isinstance(text, str)]
    texts += ["The quick brown fox jumps over the lazy dog. user assistant system"]  # the chat template's words
    bpe.train_from_iterator(texts * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="left")
    tokenizer.chat_template = importlib.resources.files("trl").joinpath("chat_templates/qwen2_5.jinja").read_text()
    shape = dict(vocab_size=len(tokenizer), hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, intermediate_size=32, pad_token_id=tokenizer.pad_token_id,
                 eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    policy = Qwen2ForCausalLM(Qwen2Config(**shape))
    policy.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id)
    reward_model = Qwen2ForSequenceClassification(Qwen2Config(**shape, num_labels=1))
    for name, model in zip(MODEL_IDS, (policy, reward_model)):
        # The Hub cache layout huggingface_hub reads offline: refs/main names a snapshot folder.
        commit = hashlib.sha1(name.encode()).hexdigest()
        repo = CACHE / "hub" / f"models--trl-internal-testing--{name}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        model.save_pretrained(repo / "snapshots" / commit)
        tokenizer.save_pretrained(repo / "snapshots" / commit)


_build_models()


@pytest.fixture(autouse=True)
def _offline_zen(monkeypatch, request):
    if hasattr(request.module, "load_dataset"):
        monkeypatch.setattr(request.module, "load_dataset", offline_load_dataset)
