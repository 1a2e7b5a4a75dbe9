"""`fipo-trl train` and `fipo-trl eval` read local data files through one table (fipo_trl/safety/data.py) and refuse a
damaged or misleading file with one line naming the file (and the line) before the model loads."""

from __future__ import annotations

import gzip
import json
import re

import pytest
import transformers

from fipo_trl.safety.data import DATA_FILE_BUILDERS, data_file_builder
from fipo_trl.tools import cli, evaluation

PROMPTS = [f"what is {w} plus one ?" for w in ("one", "two", "three", "four")] * 2


def jsonl(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))


def train_error(tmp_path, capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--model_name_or_path", str(tmp_path / "some-model"), "--output_dir", str(tmp_path / "o"),
                  "--per_device_train_batch_size", "4", "--num_generations", "4",
                  "--fipo_updates_per_generation", "2", "--reward_funcs", "fipo_trl.tools.tiny.digit_reward", *args])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("fipo-trl: error: "), error
    return error


def write_cases(tmp_path):
    good = [{"prompt": p, "answer": "2"} for p in PROMPTS]
    (tmp_path / "empty.jsonl").write_text("")
    lines = jsonl(good).splitlines()
    lines[4] = lines[4][:-1]  # a cut object on line 5
    (tmp_path / "malformed.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "latin1.jsonl").write_bytes(jsonl(good[:6]).encode() + b'{"prompt": "caf\xe9 ?", "answer": "2"}\n'
                                            + jsonl(good[:1]).encode())
    (tmp_path / "columns.json").write_text(json.dumps({"prompt": PROMPTS, "answer": ["2"] * 8}))
    (tmp_path / "two_prompts.csv").write_text("prompt,prompt,answer\n" + "".join(f"{p},{p},2\n" for p in PROMPTS))
    (tmp_path / "none.jsonl").write_text(jsonl(good[:5] + [{"prompt": None, "answer": "2"}] + good[:2]))
    (tmp_path / "number.jsonl").write_text(jsonl(good[:5] + [{"prompt": 7, "answer": "2"}] + good[:2]))
    (tmp_path / "mixed.jsonl").write_text(jsonl(good[:3] + [{"prompt": [{"role": "user", "content": PROMPTS[0]}],
                                                             "answer": "2"}] + good[:4]))
    (tmp_path / "no_content.jsonl").write_text(jsonl([{"prompt": [{"role": "user"}], "answer": "2"}] * 8))
    (tmp_path / "clash.jsonl").write_text(jsonl([{**row, "completions": "x"} for row in good]))
    (tmp_path / "label.jsonl").write_text(jsonl([{"prompt": p, "label": "2"} for p in PROMPTS]))
    lines = jsonl(good).splitlines()
    lines[2] = '{"prompt": "what is \\ud800 ?", "answer": "2"}'  # valid JSON, a lone surrogate: not Unicode text
    (tmp_path / "surrogate.jsonl").write_text("\n".join(lines) + "\n")
    model = tmp_path / "a-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")


@pytest.mark.parametrize("data, extra, match", [
    ("empty.jsonl", [], r"--dataset_name '.*empty.jsonl': the file has no rows"),
    ("malformed.jsonl", [], r"--dataset_name '.*malformed.jsonl', line 5: not valid JSON"),
    ("latin1.jsonl", [], r"--dataset_name '.*latin1.jsonl', line 7: not UTF-8 text \(byte 0xe9"),
    ("columns.json", [], r"one JSON object of columns \(\['answer', 'prompt'\]\), which datasets reads as a single "
                         r"row"),
    ("two_prompts.csv", [], r"the header repeats the column\(s\) \['prompt'\]"),
    ("none.jsonl", [], r"train_dataset: row 5's 'prompt': a NoneType"),
    ("number.jsonl", [], r"train_dataset: row 5's 'prompt': a int \(7\)"),
    ("mixed.jsonl", [], r"rows mix text prompts \(row 0\) and chat-message prompts \(row 3\)"),
    ("no_content.jsonl", [], r"row 0's 'prompt': message 0 has no 'content'"),
    ("clash.jsonl", [], r"the column\(s\) \['completions'\], a name TRL already passes to every reward function"),
    ("label.jsonl", ["--reward_funcs", "math_verify_reward"], r"math_verify_reward needs a reference answer column"),
    ("surrogate.jsonl", [], r"--dataset_name '.*surrogate.jsonl', line 3: holds a lone surrogate escape \(\\ud800\)"),
    ("a-model", [], r"--dataset_name '.*a-model' is a model folder \(config.json and weights\), not a dataset"),
])
def test_bad_data_files_fail_with_one_line_before_the_model_loads(tmp_path, capsys, no_model_load, data, extra,
                                                                  match):
    write_cases(tmp_path)
    error = train_error(tmp_path, capsys, "--dataset_name", str(tmp_path / data), *extra)
    assert re.search(match, error), error


def test_data_files_given_with_a_builder_are_checked_too(tmp_path, capsys, no_model_load):
    write_cases(tmp_path)
    error = train_error(tmp_path, capsys, "--dataset_name", "json", "--data_files", str(tmp_path / "malformed.jsonl"))
    assert re.search(r"--data_files '.*malformed.jsonl', line 5: not valid JSON", error), error


def test_one_table_of_data_files_for_train_and_eval(tmp_path):
    assert evaluation.DATA_FILE_BUILDERS is DATA_FILE_BUILDERS and not hasattr(cli, "LOCAL_FILE_BUILDERS")
    assert data_file_builder("x.jsonl.gz") == "json" and data_file_builder("x.csv.bz2") == "csv"
    assert data_file_builder("x.arrow") == "arrow" and data_file_builder("x.parquet.gz") is None
    assert data_file_builder("notes.txt") is None
    path = tmp_path / "problems.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(jsonl([{"problem": "what is one plus one ?", "answer": "2"}]))
    assert evaluation.dataset_file(str(path)) == path  # eval reads what train reads


def test_a_gzipped_jsonl_trains(tiny_model_path, tmp_path):
    path = tmp_path / "problems.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(jsonl([{"prompt": p, "answer": "2"} for p in PROMPTS]))
    dataset, name = cli.load_training_data(
        cli.FIPOScriptArguments(dataset_name=str(path)), cli.DatasetMixtureConfig(), embedded=False)
    assert name == "json: problems.jsonl.gz" and dataset["train"]["prompt"] == PROMPTS
