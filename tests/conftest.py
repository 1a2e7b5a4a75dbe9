import os

# Before anything imports triton kernels or touches the Hub: CPU Triton runs in the interpreter, nothing is fetched.
os.environ.setdefault("TRITON_INTERPRET", "1")
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny Llama causal LM and word-level tokenizer saved once per session (~0.2 s, no Hub)."""
    from fipo_trl._tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def tiny_dataset():
    from fipo_trl._tiny import tiny_prompt_dataset

    return tiny_prompt_dataset(16)
