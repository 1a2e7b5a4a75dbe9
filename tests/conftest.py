import os

# Before anything imports triton kernels or touches the Hub. Without CUDA, Triton kernels run in its CPU interpreter
# (tests/kernels test them that way). With CUDA they run compiled, as in training: an interpreter set here would be
# inherited by every subprocess and turn the GPU checks into CPU ones. TRITON_INTERPRET set by hand still wins.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():  # the same query the tests' skip marks make at collection
        os.environ["TRITON_INTERPRET"] = "1"
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny Llama causal LM and word-level tokenizer saved once per session (~0.2 s, no Hub)."""
    from fipo_trl.tools.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def tiny_dataset():
    from fipo_trl.tools.tiny import tiny_prompt_dataset

    return tiny_prompt_dataset(16)
