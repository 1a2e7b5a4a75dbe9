"""`fipo-trl eval` and the math_metrics metric with bad inputs, crashes and reruns.

Every bad argument, column or prompt template is refused with a ValueError naming the flag and the fix, before the
model is loaded; samples are saved as they are generated and a rerun resumes from them; the metric reports bad
inputs by name.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fipo_trl.tools import evaluation
from fipo_trl.tools.evaluation import SAMPLES_FILE, EvalArguments, evaluate_math
from fipo_trl.tools.math_metrics import load_math_metric

NEVER_LOADED = "nonexistent-org/never-loaded-model"  # a Hub id: only a model load would touch it


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything loads (or builds) a model or tokenizer."""
    import transformers

    import fipo_trl.tools.tiny

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(evaluation, "transformers_generator", loaded)
    monkeypatch.setattr(evaluation, "vllm_generator", loaded)
    monkeypatch.setattr(fipo_trl.tools.tiny, "build_tiny_model", loaded)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", loaded)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def eval_main(tmp_path, *flags):
    return evaluation.main(["--model_name_or_path", NEVER_LOADED, "--output_dir", str(tmp_path / "out"),
                            *map(str, flags)])


BAD_FLAGS = [  # (flags, text the error must contain: the flag with its value, and the fix)
    (["--k", 0], ["--k 0", "integer >= 1", "Fix"]),
    (["--k", -3], ["--k -3", "Fix"]),
    (["--k", 2, "--pass_k", 5], ["--pass_k [5]", "[1, --k=2]", "raise --k to 5, or drop 5 from --pass_k"]),
    (["--pass_k", 0], ["--pass_k [0]", "[1, --k=4]"]),
    (["--num_problems", 0], ["--num_problems 0", ">= 1", "Fix"]),
    (["--num_problems", -2], ["--num_problems -2"]),
    (["--temperature", -0.5], ["--temperature -0.5", ">= 0", "0 for greedy"]),
    (["--top_p", 0], ["--top_p 0.0", "(0, 1]"]),
    (["--top_p", 1.01], ["--top_p 1.01", "(0, 1]"]),
    (["--max_new_tokens", 0], ["--max_new_tokens 0", ">= 1"]),
    (["--batch_size", 0], ["--batch_size 0", ">= 1"]),
    (["--timeout_seconds", 0], ["--timeout_seconds 0.0", "> 0"]),
    (["--dtype", "float17"], ["--dtype 'float17'", "bfloat16"]),
    (["--prompt_template", "Q: {question}"], ["--prompt_template", "unknown placeholder(s) {question}",
                                              "rename it to {problem}"]),
    (["--prompt_template", "{problem"], ["--prompt_template", "broken braces", "doubled"]),
    (["--prompt_template", "}{problem}"], ["--prompt_template", "broken braces"]),
    (["--prompt_template", "Put it in \\boxed{}: {problem}"], ["unknown placeholder(s) {}", "\\boxed{{}}"]),
    (["--prompt_template", "Solve it."], ["--prompt_template", "no {problem} placeholder"]),
    (["--prompt_template", "{problem:d}"], ["--prompt_template", "cannot be filled in"]),
]


@pytest.mark.parametrize("flags,expected", BAD_FLAGS, ids=[" ".join(map(str, f)) for f, _ in BAD_FLAGS])
def test_a_bad_flag_is_refused_by_name_before_the_model_loads(tmp_path, no_model_load, flags, expected):
    with pytest.raises(ValueError) as caught:
        eval_main(tmp_path, *flags)
    for text in expected:
        assert text in str(caught.value)
    assert not (tmp_path / "out").exists()  # nothing written either


def test_bad_values_set_in_python_or_yaml_are_refused_too(tmp_path, no_model_load):
    # argparse refuses `--pass_k 1.5` itself; values set in Python (or a --config YAML) reach validate as they are
    for field, value, text in [("pass_k", [1, 2.5], "--pass_k [1, 2.5]"), ("pass_k", 4, "--pass_k 4"),
                               ("k", 2.0, "--k 2.0"),
                               ("temperature", float("nan"), "--temperature nan"),
                               ("batch_size", True, "--batch_size"),
                               ("max_new_tokens", "64", "--max_new_tokens '64'")]:
        args = EvalArguments(model_name_or_path=NEVER_LOADED, output_dir=str(tmp_path / "out"), **{field: value})
        with pytest.raises(ValueError, match="Fix"):
            evaluate_math(args)
        with pytest.raises(ValueError) as caught:
            evaluation.validate(args)
        assert text in str(caught.value), (field, str(caught.value))


def test_dataset_files_and_columns_are_checked_before_the_model_loads(tmp_path, no_model_load):
    (tmp_path / "problems.txt").write_text("what is one plus one ?\n")
    with pytest.raises(ValueError, match=r"--dataset_name .*problems.txt.*unsupported file type '.txt'.*\.jsonl"):
        eval_main(tmp_path, "--dataset_name", tmp_path / "problems.txt")
    with pytest.raises(ValueError, match=r"--dataset_name .*missing.jsonl.*no such file"):
        eval_main(tmp_path, "--dataset_name", tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"--dataset_name 'data/aime.parquet': no such file"):
        eval_main(tmp_path, "--dataset_name", "data/aime.parquet")

    data = write_jsonl(tmp_path / "aime.jsonl", [{"question": "what is one plus one ?", "solution": "2"}])
    with pytest.raises(ValueError) as caught:
        eval_main(tmp_path, "--dataset_name", data)
    message = str(caught.value)
    assert "--problem_column 'problem' is not a column" in message and "['question', 'solution']" in message
    with pytest.raises(ValueError, match=r"--answer_column 'answer' is not a column.*\['question', 'solution'\]"):
        eval_main(tmp_path, "--dataset_name", data, "--problem_column", "question")
    with pytest.raises(ValueError, match=r"--problem_column 'question' is not a column of builtin"):
        eval_main(tmp_path, "--problem_column", "question")  # the built-in problem set too

    holes = write_jsonl(tmp_path / "holes.jsonl", [{"problem": "what is one plus one ?", "answer": "2"},
                                                   {"problem": "what is two plus two ?", "answer": None}])
    with pytest.raises(ValueError, match=r"--answer_column 'answer': row 1 of .* has no answer"):
        eval_main(tmp_path, "--dataset_name", holes)
    with pytest.raises(ValueError, match=r"--model_name_or_path './no/such/model': no such folder"):
        evaluation.main(["--model_name_or_path", "./no/such/model", "--output_dir", str(tmp_path / "out")])


def test_the_console_script_prints_the_error_and_exits_2(tmp_path):
    script = Path(sys.executable).with_name("fipo-trl")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fipo_trl.tools.cli"]
    result = subprocess.run([*command, "eval", "--k", "2", "--pass_k", "5", "--model_name_or_path", NEVER_LOADED,
                             "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "fipo-trl: error: --pass_k [5]" in result.stderr and "Traceback" not in result.stderr


# --- Samples saved as they are generated; reruns resume -----------------------------------------------------------

SMALL = ["--k", 2, "--batch_size", 1, "--max_new_tokens", 3]  # the built-in 4 problems, one generate call each


def tiny_eval(out: Path, *flags):
    return evaluation.main(["--output_dir", str(out), *map(str, SMALL), *map(str, flags)])


REAL_GENERATOR = evaluation.transformers_generator


def count_generate_calls(monkeypatch, fail_at_call=None):
    """Wrap the transformers generator: record each call's number of prompts, optionally crash at one call."""
    real, calls = REAL_GENERATOR, []

    def generator(model_path, args):
        generate = real(model_path, args)

        def wrapped(prompts, seed):
            calls.append(len(prompts))
            if len(calls) == fail_at_call:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return generate(prompts, seed)

        return wrapped

    monkeypatch.setattr(evaluation, "transformers_generator", generator)
    return calls


def saved_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / SAMPLES_FILE).read_text().splitlines()]


def test_a_crash_keeps_the_samples_and_a_rerun_resumes_to_the_same_result(tmp_path, monkeypatch):
    straight = tiny_eval(tmp_path / "straight")  # uninterrupted, for comparison

    calls = count_generate_calls(monkeypatch, fail_at_call=3)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        tiny_eval(tmp_path / "out")
    lines = saved_lines(tmp_path / "out")
    assert lines[0]["eval_samples_header"]["k"] == 2  # the header: the sampling arguments
    assert [line["index"] for line in lines[1:]] == [0, 1]  # problems 0 and 1 were saved as they finished
    assert all(len(line["completions"]) == 2 for line in lines[1:])
    assert not (tmp_path / "out" / "eval_results.json").exists()

    calls = count_generate_calls(monkeypatch)
    resumed = tiny_eval(tmp_path / "out")
    assert calls == [1, 1]  # only problems 2 and 3 were generated
    # per-batch seeds: the resumed samples are the ones an uninterrupted run makes
    assert [s["completions"] for s in resumed["samples"]] == [s["completions"] for s in straight["samples"]]
    assert resumed["metrics"] == straight["metrics"]
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text())["num_problems"] == 4

    # Everything sampled: a rerun (here with other pass@k) only rescores, without loading the model.
    monkeypatch.setattr(evaluation, "transformers_generator", None)  # calling it would fail
    rescored = tiny_eval(tmp_path / "out", "--pass_k", 2)
    assert set(rescored["metrics"]) == {"avg@2", "pass@2", "cons@2"}


def test_a_rerun_with_other_sampling_arguments_is_refused_instead_of_mixing(tmp_path, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    header = evaluation.sampling_header(EvalArguments(**{"k": 2, "batch_size": 1, "max_new_tokens": 3}))
    problems = [p["problem"] for p in evaluation.BUILTIN_PROBLEMS]
    write_jsonl(out / SAMPLES_FILE, [header, {"index": 0, "problem": problems[0], "reference": "2",
                                              "completions": ["a", "b"]}])
    for flags, text in [(["--k", 3], "--k: 2 there, 3 now"), (["--temperature", 0.5], "--temperature: 1.0 there"),
                        (["--prompt_template", "Q: {problem}"], "--prompt_template: '{problem}' there")]:
        with pytest.raises(ValueError) as caught:
            evaluation.main(["--output_dir", str(out), *map(str, ["--k", 2, "--max_new_tokens", 3, *flags])])
        assert text in str(caught.value) and "delete" in str(caught.value) and "--output_dir" in str(caught.value)


def test_a_half_written_line_is_dropped_and_a_changed_dataset_is_refused(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "aime.jsonl", [{"problem": "what is one plus one ?", "answer": "2"},
                                                 {"problem": "what is two plus three ?", "answer": "5"}])
    out = tmp_path / "out"
    tiny_eval(out, "--dataset_name", data)
    lines = (out / SAMPLES_FILE).read_text().splitlines(keepends=True)
    (out / SAMPLES_FILE).write_text("".join(lines[:2]) + lines[2][:15])  # killed while writing problem 1
    calls = count_generate_calls(monkeypatch)
    results = tiny_eval(out, "--dataset_name", data)
    assert calls == [1] and results["num_problems"] == 2
    assert [line["index"] for line in saved_lines(out)[1:]] == [0, 1]

    write_jsonl(data, [{"problem": "what is four plus four ?", "answer": "8"}])  # same path, other problems
    with pytest.raises(ValueError, match=r"sample 0 in .* is for another problem.*Fix"):
        tiny_eval(out, "--dataset_name", data)


def test_temperature_zero_decodes_greedily(tmp_path):
    results = tiny_eval(tmp_path / "out", "--temperature", 0, "--num_problems", 2)
    assert all(len(set(s["completions"])) == 1 for s in results["samples"])


# --- The math_metrics metric --------------------------------------------------------------------------------------

BAD_METRIC_INPUTS = [  # (compute kwargs, text the ValueError must contain)
    (dict(predictions=[], references=[]), "predictions is empty"),
    (dict(predictions=None, references=["4"]), "predictions must be a list"),
    (dict(predictions=[["\\boxed{4}"]], references=["4", "5"]), "predictions has 1 problems but references has 2"),
    (dict(predictions=["\\boxed{4}"], references=["4"]), "predictions[0] is of type str, not a list of completions"),
    (dict(predictions=[[]], references=["4"]), "predictions[0] has no completions"),
    (dict(predictions=[["a"], ["b", "c"]], references=["1", "2"]), "predictions[1] has 2 completions but"),
    (dict(predictions=[["\\boxed{4}", 4]], references=["4"]), "predictions[0][1] is 4 (type int)"),
    (dict(predictions=[["\\boxed{4}"]], references=[None]), "references[0] is None"),
    (dict(predictions=[["\\boxed{4}"]], references=[""]), "references[0] is empty"),
    (dict(predictions=[["\\boxed{4}"]], references=[["4"]]), "references[0] is ['4']"),
    (dict(predictions=[["\\boxed{4}"]], references=["4"], k=0), "k=0 is below 1"),
    (dict(predictions=[["\\boxed{4}"]], references=["4"], k=-1), "k=-1 is below 1"),
    (dict(predictions=[["\\boxed{4}"]], references=["4"], k=1.5), "k must be an integer"),
    (dict(predictions=[["\\boxed{4}"]], references=["4"], k="1"), "k must be an integer"),
    (dict(predictions=[["\\boxed{4}"]], references=["4"], k=[]), "k is empty"),
    (dict(predictions=[["\\boxed{4}"] * 2], references=["4"], k=[1, 3]), "k=3 is larger than the n=2 samples"),
    (dict(predictions=[["\\boxed{4}"]], references=["4"], timeout_seconds=0), "timeout_seconds must be"),
    (dict(predictions=[["\\boxed{4}"]], references=["4"], max_answer_chars=0), "max_answer_chars must be"),
]


@pytest.fixture(scope="module")
def metric():
    return load_math_metric()


@pytest.mark.parametrize("inputs,expected", BAD_METRIC_INPUTS, ids=[e for _, e in BAD_METRIC_INPUTS])
def test_the_metric_names_a_bad_input(metric, inputs, expected):
    with pytest.raises(ValueError) as caught:
        metric.compute(**inputs)
    assert expected in str(caught.value)


def test_missing_completions_score_as_wrong_and_numeric_references_as_text(metric):
    scores = metric.compute(predictions=[[None, "", "\\boxed{4}"], ["\\boxed{2.5}", None, None]],
                            references=[4, 2.5], k=[1, 3])
    assert scores["correct_counts"] == [1, 1] and scores["avg@3"] == pytest.approx(2 / 6)
    assert scores["cons@3"] == 1.0  # no answer does not vote: the one answer wins
    metric.add(prediction=["\\boxed{7}", None], reference=7)  # add / add_batch take the same inputs
    metric.add_batch(predictions=[[None, None]], references=["1"])
    assert metric.compute(k=2)["correct_counts"] == [1, 0]


# --- Round 2: damaged sample lines, the dtype, a model that does not load, answers that are not one value ---------

@pytest.mark.parametrize("damage", [b"[]", b"{not json", b'{"index": 1}', b'"a string"', b'{"index": 1, "problem": '
                                    b'"what is one plus one ?", "reference": "2", "completions": ["only one"]}'])
def test_a_damaged_line_in_the_middle_is_skipped_and_every_intact_sample_kept(tmp_path, monkeypatch, damage):
    """The rerun used to truncate the file at the damaged line (every sample after it lost); `[]` raised an
    AttributeError."""
    straight = tiny_eval(tmp_path / "straight")
    out = tmp_path / "out"
    tiny_eval(out)
    path = out / SAMPLES_FILE
    lines = path.read_bytes().splitlines(keepends=True)  # header, problems 0-3
    path.write_bytes(b"".join([lines[0], lines[1], damage + b"\n", lines[3], lines[4]]))  # problem 1 damaged
    calls = count_generate_calls(monkeypatch)
    with pytest.warns(UserWarning, match=r"skipped 1 damaged line\(s\) \(line 3\); the 3 intact samples are kept"):
        results = tiny_eval(out)
    assert calls == [1]  # only problem 1 is sampled again
    assert [s["completions"] for s in results["samples"]] == [s["completions"] for s in straight["samples"]]
    kept = path.read_bytes().splitlines(keepends=True)
    assert kept[:5] == [lines[0], lines[1], damage + b"\n", lines[3], lines[4]]  # nothing after the damage lost
    assert json.loads(kept[5])["index"] == 1 and len(kept) == 6


def test_a_hole_is_filled_with_the_samples_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """With batches of 2, the batch holding the damaged line is generated again with its own seed."""
    straight = tiny_eval(tmp_path / "straight", "--batch_size", 2)
    out = tmp_path / "out"
    tiny_eval(out, "--batch_size", 2)
    path = out / SAMPLES_FILE
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([lines[0], lines[1], lines[2], lines[3], b"garbage\n"]))  # problem 3 damaged
    calls = count_generate_calls(monkeypatch)
    with pytest.warns(UserWarning, match="damaged"):
        results = tiny_eval(out, "--batch_size", 2)
    assert calls == [2]
    assert [s["completions"] for s in results["samples"]] == [s["completions"] for s in straight["samples"]]


def test_a_damaged_header_is_refused_and_a_header_only_file_never_blocks(tmp_path, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / SAMPLES_FILE).write_text('[]\n{"index": 0}\n')
    with pytest.raises(ValueError, match="is not an eval samples file.*Fix"):
        eval_main(tmp_path, "--k", 2)
    other = evaluation.sampling_header(EvalArguments(model_name_or_path="org/typo", k=7))
    (out / SAMPLES_FILE).write_text(json.dumps(other) + "\n")  # left by a run that never sampled anything
    with pytest.raises(AssertionError, match="the model was loaded"):  # past the samples check: the load comes next
        eval_main(tmp_path, "--k", 2)


def test_a_dtype_no_model_loads_in_is_refused_before_anything_is_written(tmp_path, no_model_load):
    with pytest.raises(ValueError, match=r"--dtype 'float8_e4m3fn': a model is loaded in one of auto, bfloat16, "
                                         r"float16, float32\. Fix"):
        eval_main(tmp_path, "--dtype", "float8_e4m3fn")
    assert not (tmp_path / "out" / SAMPLES_FILE).exists()


def test_a_model_that_does_not_load_is_one_error_line_and_the_corrected_rerun_runs(tmp_path, capsys):
    from fipo_trl.tools import cli

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--model_name_or_path", "nonexistent-org/mistyped-model", "--output_dir", str(out),
                  *map(str, SMALL)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("fipo-trl: error: --model_name_or_path 'nonexistent-org/mistyped-model' could not be "
                            "loaded") and "Fix" in error
    assert not (out / SAMPLES_FILE).exists()  # no header written before the model loaded
    assert tiny_eval(out)["num_problems"] == 4  # the corrected run (the built-in model) is not refused


@pytest.mark.parametrize("answer", [[3], {"value": 3}, ["3", "4"]])
def test_an_answer_that_is_not_one_value_is_refused_naming_the_column(tmp_path, no_model_load, answer):
    """It was stringified ("[3]"), so a correct \\boxed{3} scored 0."""
    data = write_jsonl(tmp_path / "problems.jsonl", [{"problem": "1 + 2 ?", "answer": answer}])
    with pytest.raises(ValueError, match=rf"--answer_column 'answer': row 0 of .* is a {type(answer).__name__} "
                                         r".*not one answer.*Fix"):
        eval_main(tmp_path, "--dataset_name", data)


def test_the_results_table_escapes_a_pipe_in_a_name():
    table = evaluation.markdown_table("org/model|x", "data|set <b>", {"avg@2": 0.5, "pass@2": 1.0})
    row = table.splitlines()[2]
    cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]]
    assert cells == [r"org/model\|x", r"data\|set &lt;b&gt;", "50.0", "100.0"]


# --- Round 3 (docs/reliability.md) ------------------------------------------------------------------------------

def test_a_checkpoint_still_being_saved_is_named_before_anything_loads(tmp_path, no_model_load):
    checkpoint = tmp_path / "run" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"\x10\x00")  # half written
    (tmp_path / "run" / "_saving_checkpoint-4").write_text("saving\n")
    with pytest.raises(ValueError, match=r"--model_name_or_path '.*checkpoint-4' is being written: its "
                                         r"save-in-progress marker .*_saving_checkpoint-4 is there.*Fix: wait"):
        evaluation.main(["--model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / "out")])


def test_a_full_disk_says_the_samples_so_far_are_kept_and_a_rerun_resumes(tmp_path, monkeypatch):
    import errno

    real_append = evaluation.append_samples
    appended = []

    def fills_the_disk(path, *args):
        if len(appended) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        appended.append(args)
        real_append(path, *args)

    monkeypatch.setattr(evaluation, "append_samples", fills_the_disk)
    with pytest.raises(OSError, match=r"No space left on device while writing .*eval_samples.jsonl. The 2 problems "
                                      r"sampled so far are kept in .*: free space, then rerun the same command"):
        tiny_eval(tmp_path / "out")
    monkeypatch.setattr(evaluation, "append_samples", real_append)
    assert len(saved_lines(tmp_path / "out")) == 3  # the header and the 2 problems: kept
    calls = count_generate_calls(monkeypatch)
    assert tiny_eval(tmp_path / "out")["num_problems"] == 4 and calls == [1, 1]  # resumed: problems 2 and 3 only


def test_references_that_never_parse_are_named_by_row(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "data.jsonl", [{"problem": "what is one plus one ?", "answer": answer}
                                                  for answer in ("2", "\\frac{", "5", "\\sqrt[")])
    with pytest.warns(UserWarning, match=r"--answer_column 'answer': 2 reference answer\(s\) of .* do not parse .*"
                                         r"row 1 \('\\\\frac\{'\), row 3 .*Fix: repair"):
        tiny_eval(tmp_path / "out", "--dataset_name", data)
