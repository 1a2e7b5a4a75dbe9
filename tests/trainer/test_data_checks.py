"""FIPOTrainer checks the training data before the model loads (fipo_trl/safety/data.py: check_training_data): prompts
of the wrong type, empty, without 'content', of mixed formats, too long for an absolute position table; a column that
clashes with TRL's reward arguments; math_verify_reward without an answer column."""

from __future__ import annotations

import warnings

import pytest
import transformers
from datasets import Dataset

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.rewards import math_verify_reward
from fipo_trl.safety.prompts import absolute_position_limit, check_prompts
from fipo_trl.tools.tiny import build_tiny_tokenizer, digit_reward, tiny_prompt_dataset


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))


def make(model, dataset, tmp_path, reward=digit_reward, **overrides):
    args = FIPOConfig(**{**dict(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, num_generations=4,
                                fipo_updates_per_generation=2, max_completion_length=8, report_to="none"),
                         **overrides})
    return FIPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset)


def rows(prompts, **columns):
    prompts = list(prompts) * (8 // len(prompts) + 1)
    return Dataset.from_list([{"prompt": p, "answer": "2", **columns} for p in prompts[:8]])


CHAT = [{"role": "user", "content": "what is one plus one ?"}]


@pytest.mark.parametrize("prompts, match", [
    (["what is one plus one ?", ""], r"row 1's 'prompt': empty text"),
    (["what is one plus one ?", "   "], r"row 1's 'prompt': empty text"),
    ([CHAT, [{"role": "user"}]], r"row 1's 'prompt': message 0 has no 'content'"),
    ([CHAT, []], r"row 1's 'prompt': an empty message list"),
])
def test_bad_prompts_are_refused_before_the_model_loads(tiny_model_path, tmp_path, no_model_load, prompts, match):
    with pytest.raises(ValueError, match=match):
        make(tiny_model_path, rows(prompts), tmp_path)


def test_none_int_and_mixed_prompts_are_refused():
    # What a JSON-lines file gives (datasets keeps such a column as JSON values): tests/cli/test_data_files.py
    for prompts, match in ((["what is one plus one ?", None], r"row 1's 'prompt': a NoneType"),
                           (["what is one plus one ?", 3], r"row 1's 'prompt': a int \(3\)"),
                           ([CHAT, [CHAT[0], "text"]], r"row 1's 'prompt': message 1 is a str"),
                           (["what is one plus one ?", CHAT], r"rows mix text prompts \(row 0\) and chat-message "
                                                              r"prompts \(row 1\)")):
        with pytest.raises(ValueError, match=match):
            check_prompts(prompts)
    assert check_prompts([CHAT, CHAT]) == "chat" and check_prompts(["a", "b"]) == "text"


def test_a_column_named_like_a_reward_argument_is_refused(tiny_model_path, tmp_path, no_model_load):
    dataset = tiny_prompt_dataset(8).add_column("completions", ["x"] * 8)
    with pytest.raises(ValueError, match=r"column\(s\) \['completions'\].*reserved.*rename_column\('completions'"):
        make(tiny_model_path, dataset, tmp_path)


def test_math_verify_reward_without_an_answer_column_is_refused_before_generation(tiny_model_path, tmp_path,
                                                                                    no_model_load):
    dataset = tiny_prompt_dataset(8).rename_column("answer", "label")
    with pytest.raises(ValueError, match=r"math_verify_reward needs a reference answer column.*\['prompt', 'label'\]"):
        make(tiny_model_path, dataset, tmp_path, reward=math_verify_reward)


def test_good_data_passes(tiny_model_path, tmp_path):
    trainer = make(tiny_model_path, tiny_prompt_dataset(8, conversational=True), tmp_path)
    assert trainer.train_dataset.num_rows == 8


@pytest.fixture(scope="module")
def tiny_gpt2_path(tmp_path_factory):
    """A GPT-2 (learned absolute positions, a 16-position table) with the tiny tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = build_tiny_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_the_position_limit_is_only_that_of_an_absolute_table(tiny_model_path, tiny_gpt2_path):
    assert absolute_position_limit(transformers.AutoConfig.from_pretrained(tiny_gpt2_path)) == 16
    assert absolute_position_limit(transformers.AutoConfig.from_pretrained(tiny_model_path)) is None  # RoPE Llama


def test_a_prompt_longer_than_the_position_table_is_refused_before_the_model_loads(tiny_gpt2_path, tmp_path,
                                                                                   no_model_load):
    long = " ".join(["one plus"] * 6) + " ?"  # 13 words: 13 + 8 completion tokens > 16 positions
    with pytest.raises(ValueError, match=r"row 1's prompt is 13 tokens; with max_completion_length 8 that is 21 "
                                         r"positions, but the model's position table has 16.*at most 3"):
        make(tiny_gpt2_path, rows(["what is one plus one ?", long]), tmp_path)
    # a short dataset passes the check (the model then loads: no_model_load stops it there)
    with pytest.raises(AssertionError, match="the model was loaded"):
        make(tiny_gpt2_path, rows(["what is one plus one ?"]), tmp_path)


# --- Round 3 (docs/reliability.md) ------------------------------------------------------------------------------

def test_a_prompt_past_a_rotary_models_positions_is_warned_about_before_the_model_loads(tiny_model_path, tmp_path,
                                                                                        no_model_load):
    long = " ".join(["one plus"] * 130) + " ?"  # 261 words: past the tiny Llama's 256 positions
    with pytest.warns(UserWarning, match=r"train_dataset: 4 prompt\(s\) plus max_completion_length 8 run past the "
                                         r"256 positions the model was trained on .*row 1, \d+ tokens.*Fix"):
        with pytest.raises(AssertionError, match="the model was loaded"):  # the warning came first
            make(tiny_model_path, rows(["what is one plus one ?", long]), tmp_path)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(AssertionError, match="the model was loaded"):
        warnings.simplefilter("always")
        make(tiny_model_path, rows(["what is one plus one ?"]), tmp_path)
    assert not [w for w in caught if "run past" in str(w.message)]


def test_media_content_parts_for_a_text_only_model_are_refused_before_it_loads(tiny_model_path, tmp_path,
                                                                               no_model_load):
    parts = [{"role": "user", "content": [{"type": "image", "text": None},
                                          {"type": "text", "text": "what is one plus one ?"}]}]
    with pytest.raises(ValueError, match=r"row 0's message 0 has content parts of type 'image', which only a "
                                         r"vision-language model reads; this model \(llama\) is text-only.*Fix"):
        make(tiny_model_path, rows([parts]), tmp_path)


def test_a_max_completion_length_past_a_rotary_models_positions_is_named_without_tokenizing(tiny_model_path, tmp_path,
                                                                                          no_model_load):
    with pytest.warns(UserWarning, match=r"max_completion_length 300 alone runs past the 256 positions .*Fix: lower "
                                         r"max_completion_length below 256"):
        with pytest.raises(AssertionError, match="the model was loaded"):
            make(tiny_model_path, rows(["what is one plus one ?"]), tmp_path, max_completion_length=300)
