"""One run per output_dir, and resumes that continue the run they name (fipo_trl/safety/): a fresh run never
mixes its checkpoints with another run's, a second run into a busy output_dir is refused (a dead run's lock is taken
over), a resume with changed settings is told what changed (the card records it) and refused where the change
breaks the run, and each kind of folder passed to resume_from_checkpoint is named for what it is."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import transformers

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.safety.checkpoint_files import checkpoint_problems, is_model_only
from fipo_trl.safety.lock import LOCK_FILE, acquire_output_dir_lock, release_output_dir_lock
from fipo_trl.safety.resume import resolve_resume, set_aside_incomplete
from fipo_trl.safety.run_settings import RUN_SETTINGS_FILE, check_dynamic_sampling_seed
from fipo_trl.tools import cli
from fipo_trl.tools.tiny import build_tiny_model, digit_reward, tiny_prompt_dataset

SETTINGS = dict(bf16=False, per_device_train_batch_size=4, num_generations=4, max_completion_length=4, max_steps=2,
                learning_rate=1e-2, fipo_updates_per_generation=2, report_to="none", logging_steps=1,
                save_strategy="steps", save_steps=2, gradient_checkpointing=False, seed=0, disable_tqdm=True)


def make_trainer(model_path, output_dir, dataset=None, **overrides):
    args = FIPOConfig(output_dir=str(output_dir), **{**SETTINGS, **overrides})
    return FIPOTrainer(model=model_path, reward_funcs=digit_reward, args=args,
                       train_dataset=dataset if dataset is not None else tiny_prompt_dataset(16))


@pytest.fixture(scope="module")
def finished_run(tiny_model_path, tmp_path_factory):
    """A 2-step run with its checkpoint-2."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    make_trainer(tiny_model_path, output_dir).train()
    assert (output_dir / "checkpoint-2" / RUN_SETTINGS_FILE).is_file() and not (output_dir / LOCK_FILE).exists()
    return output_dir


def copy_run(finished_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


def data_file(tmp_path) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"what is {w} plus one ?", "answer": "2"}) + "\n"
                            for w in ("one", "two", "three", "four") * 4))
    return str(path)


def cli_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *args])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("fipo-trl: error: "), error
    return error


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output_dir was checked")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))


# --- A fresh run into another run's output_dir -------------------------------------------------------------------

def test_a_fresh_run_refuses_an_output_dir_holding_another_runs_checkpoints(tiny_model_path, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    before = (run / "checkpoint-2" / "model.safetensors").read_bytes()
    trainer = make_trainer(tiny_model_path, run)
    match = (r"already holds checkpoints of a run \(checkpoint-2\).*--resume_from_checkpoint true.*"
             r"--overwrite_output_dir true.*new --output_dir")
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert trainer.state.global_step == 0 and (run / "checkpoint-2" / "model.safetensors").read_bytes() == before
    assert not (run / LOCK_FILE).exists()  # released on the error


def test_overwrite_output_dir_moves_the_old_checkpoints_aside(tiny_model_path, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    old = (run / "checkpoint-2" / "model.safetensors").read_bytes()
    trainer = make_trainer(tiny_model_path, run, overwrite_output_dir=True, learning_rate=5e-2)
    with pytest.warns(UserWarning, match=r"moved the 1 checkpoint\(s\) of the earlier run .* to .*previous-run-1"):
        trainer.train()
    assert (run / "previous-run-1" / "checkpoint-2" / "model.safetensors").read_bytes() == old  # kept
    assert (run / "checkpoint-2" / "model.safetensors").read_bytes() != old  # the new run's own checkpoint


def test_the_cli_refuses_it_before_the_model_loads(finished_run, tmp_path, capsys, no_model_load):
    run = copy_run(finished_run, tmp_path)
    error = cli_error(capsys, "--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(run),
                      "--dataset_name", data_file(tmp_path))
    assert "already holds checkpoints" in error and "--overwrite_output_dir true" in error


# --- The lock ----------------------------------------------------------------------------------------------------

HOLDER = ("import sys; from fipo_trl.checkpoints import acquire_output_dir_lock as a; a(sys.argv[1]); "
          "print('held', flush=True); sys.stdin.read()")


def test_a_second_run_into_a_busy_output_dir_is_refused_and_a_dead_runs_lock_is_taken_over(tiny_model_path,
                                                                                             tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = rf"output_dir '{re.escape(str(out))}' is in use by another fipo_trl run \(pid {holder.pid} on "
        with pytest.raises(ValueError, match=busy + r".*Fix: wait for that run to end, or pass another --output_dir"):
            acquire_output_dir_lock(out)
        trainer = make_trainer(tiny_model_path, out, save_strategy="no")
        with pytest.raises(ValueError, match=busy):
            trainer.train()
        assert trainer.state.global_step == 0
        error = cli_error(capsys, "--output_dir", str(out), "--max_steps", "1")  # the embedded run, before it builds
        assert re.search(busy, error) and not (out / "_base-model").exists()
    finally:
        holder.kill()  # like a crash: the lock file stays behind
        holder.wait()
    assert f"pid {holder.pid}" in (out / LOCK_FILE).read_text()
    acquire_output_dir_lock(out)  # the kernel dropped the dead process's lock: taken over
    acquire_output_dir_lock(out)  # re-entrant in one process
    assert f"pid {__import__('os').getpid()}" in (out / LOCK_FILE).read_text()
    release_output_dir_lock(out)
    assert (out / LOCK_FILE).exists()
    release_output_dir_lock(out)
    assert not (out / LOCK_FILE).exists()


# --- Resuming with other settings --------------------------------------------------------------------------------

def test_a_resume_with_changed_settings_warns_and_the_card_records_it(tiny_model_path, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    record = json.loads((run / "checkpoint-2" / RUN_SETTINGS_FILE).read_text())
    assert record["settings"]["fipo_decay_rate"] == 32.0 and record["settings"]["world_size"] == 1
    record["settings"]["world_size"] = 2  # as if the checkpoint came from a 2-process run
    (run / "checkpoint-2" / RUN_SETTINGS_FILE).write_text(json.dumps(record))
    trainer = make_trainer(tiny_model_path, run, dataset=tiny_prompt_dataset(16, seed=1), max_steps=4,
                           fipo_decay_rate=64.0, num_generations=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=True)
    (message,) = [str(w.message) for w in caught if "was saved with other settings" in str(w.message)]
    assert "fipo_decay_rate: 32.0 -> 64.0" in message and "num_generations: 4 -> 2" in message
    assert "world_size: 2 -> 1 processes (the per-process RNG states" in message
    assert "train_dataset: another dataset" in message and "seed" not in message.split("train_dataset")[0]
    saved = json.loads((run / "checkpoint-4" / RUN_SETTINGS_FILE).read_text())
    assert saved["settings"]["fipo_decay_rate"] == 64.0 and saved["resumed"][0]["step"] == 2
    trainer.create_model_card()
    card = (run / "README.md").read_text()
    assert "The run was resumed with other settings" in card and "at step 2:" in card
    assert "fipo\\_decay\\_rate: 32.0 -&gt; 64.0" in card  # as Markdown text (fipo_trl.tools.model_card.markdown_text)


def test_a_resume_with_the_same_settings_says_nothing(tiny_model_path, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    trainer = make_trainer(tiny_model_path, run, max_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=True)
    assert not [w for w in caught if "other settings" in str(w.message)]
    assert json.loads((run / "checkpoint-4" / RUN_SETTINGS_FILE).read_text())["resumed"] == []


def test_another_seed_under_dynamic_sampling_is_refused_before_anything_loads(finished_run, tmp_path, capsys,
                                                                            no_model_load):
    run = copy_run(finished_run, tmp_path)
    checkpoint = run / "checkpoint-2"
    args = FIPOConfig(output_dir=str(run), **{**SETTINGS, "seed": 5}, dynamic_sampling=True)
    with pytest.raises(ValueError, match=r"trained with seed 0 and dynamic sampling, this run has seed 5.*--seed 0"):
        check_dynamic_sampling_seed(checkpoint, args)
    (checkpoint / RUN_SETTINGS_FILE).unlink()  # an older checkpoint: the refill stream's own state has the seed
    (checkpoint / "dynamic_sampling_state_0.json").write_text(json.dumps({"seed": 1, "epoch": 0, "position": 8}))
    with pytest.raises(ValueError, match=r"trained with seed 0"):
        check_dynamic_sampling_seed(checkpoint, args)
    error = cli_error(capsys, "--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(run),
                      "--resume_from_checkpoint", str(checkpoint), "--dynamic_sampling", "true", "--seed", "5",
                      "--dataset_name", data_file(tmp_path))
    assert "--seed 0" in error


def test_another_architecture_is_a_clear_error_before_the_checkpoint_loads(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    smaller = str(build_tiny_model(tmp_path / "smaller", hidden_size=32))
    trainer = make_trainer(smaller, run, max_steps=4)
    match = r"another model architecture \(hidden_size: 64 in the checkpoint, 32 in .*; intermediate_size"
    with pytest.raises(ValueError, match=match):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0
    error = cli_error(capsys, "--model_name_or_path", smaller, "--output_dir", str(run),
                      "--resume_from_checkpoint", "true", "--dataset_name", data_file(tmp_path))
    assert re.search(match, error), error


# --- What the folder passed to resume_from_checkpoint is ---------------------------------------------------------

def make_model_only(checkpoint: Path) -> None:
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (checkpoint / name).unlink()


def test_a_model_only_checkpoint_is_named_as_such_not_as_partial(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-4")
    make_model_only(run / "checkpoint-4")
    assert is_model_only(checkpoint_problems(run / "checkpoint-4"))
    with pytest.raises(ValueError, match=r"checkpoint-4 was saved with save_only_model=True.*Fix: add "
                                         r"--save_only_model true.*--model_name_or_path"):
        resolve_resume(str(run / "checkpoint-4"), run)
    assert resolve_resume(str(run / "checkpoint-4"), run, training_state=False)[0] == str(run / "checkpoint-4")
    chosen, messages = resolve_resume(True, run)  # the newest full checkpoint, the model-only one named
    assert chosen == str(run / "checkpoint-2") and len(messages) == 1
    assert "skipping" in messages[0] and "save_only_model=True" in messages[0] and "kill" not in messages[0]
    assert set_aside_incomplete(run, after_step=2) == [] and (run / "checkpoint-4").is_dir()  # complete: kept
    make_model_only(run / "checkpoint-2")
    with pytest.raises(ValueError, match=r"was saved with save_only_model=True"):
        resolve_resume(True, run)


def test_the_output_dir_or_a_saved_model_passed_as_the_checkpoint(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    chosen, messages = resolve_resume(str(run), tmp_path / "elsewhere")
    assert chosen == str(run / "checkpoint-2") and "is a run's output_dir, not one of its checkpoints" in messages[0]
    model = tmp_path / "saved-model"
    shutil.copytree(run / "checkpoint-2", model, ignore=shutil.ignore_patterns("trainer_state.json", "*.pt", "*.pth"))
    with pytest.raises(ValueError, match=r"is not a checkpoint: it has no trainer_state.json.*--model_name_or_path"):
        resolve_resume(str(model), run)


# --- Round 3 (docs/reliability.md) ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_the_lock_never_follows_a_link_nor_writes_into_a_file_it_does_not_own(tmp_path, kind):
    import os

    output_dir, outside = tmp_path / "out", tmp_path / "precious.txt"
    output_dir.mkdir()
    outside.write_text("a file outside output_dir\n")
    lock = output_dir / LOCK_FILE
    {"symlink": lambda: lock.symlink_to(outside), "hardlink": lambda: os.link(outside, lock),
     "fifo": lambda: os.mkfifo(lock)}[kind]()
    what = {"symlink": "is a symbolic link", "hardlink": r"is a hard link \(2 names\)",
            "fifo": "is not a regular file"}[kind]
    with pytest.raises(ValueError, match=rf"the run's lock file .*{what}.*Fix: remove"):
        acquire_output_dir_lock(output_dir)
    assert outside.read_text() == "a file outside output_dir\n"  # neither truncated nor written


def test_the_lock_takes_over_a_dead_runs_plain_file(tmp_path):
    (tmp_path / LOCK_FILE).write_text("pid 1 on gone-host, since long ago\n")
    acquire_output_dir_lock(tmp_path)
    try:
        assert (tmp_path / LOCK_FILE).read_text().startswith("pid ")
        assert "gone-host" not in (tmp_path / LOCK_FILE).read_text()
    finally:
        release_output_dir_lock(tmp_path)


@pytest.fixture(scope="module")
def four_step_run(tiny_model_path, tmp_path_factory):
    """A 4-step run with checkpoint-2 and checkpoint-4."""
    output_dir = tmp_path_factory.mktemp("four") / "run"
    make_trainer(tiny_model_path, output_dir, max_steps=4).train()
    assert (output_dir / "checkpoint-4").is_dir()
    return output_dir


def weights_of(checkpoint: Path) -> bytes:
    return (checkpoint / "model.safetensors").read_bytes()


def test_resuming_an_older_checkpoint_never_overwrites_a_newer_one(four_step_run, tmp_path, capsys, no_model_load):
    run = copy_run(four_step_run, tmp_path)
    newest = weights_of(run / "checkpoint-4")
    flags = ["--model_name_or_path", str(tmp_path / "model"), "--dataset_name", data_file(tmp_path), "--output_dir",
             str(run), "--resume_from_checkpoint", str(run / "checkpoint-2"), "--max_steps", "4"]
    error = cli_error(capsys, *flags)  # before the model loads
    assert "checkpoint-2 is at step 2, but output_dir" in error
    assert "newer complete checkpoints (checkpoint-4)" in error
    assert "--overwrite_output_dir true" in error and "--resume_from_checkpoint true" in error
    assert weights_of(run / "checkpoint-4") == newest


def test_train_refuses_it_too_and_the_newer_checkpoint_stays(tiny_model_path, four_step_run, tmp_path):
    run = copy_run(four_step_run, tmp_path)
    newest = weights_of(run / "checkpoint-4")
    with pytest.raises(ValueError, match="newer complete checkpoints"):
        make_trainer(tiny_model_path, run, max_steps=4, learning_rate=5e-3).train(str(run / "checkpoint-2"))
    assert weights_of(run / "checkpoint-4") == newest


def test_branching_with_overwrite_output_dir_moves_the_newer_checkpoints_aside(tiny_model_path, four_step_run,
                                                                               tmp_path):
    run = copy_run(four_step_run, tmp_path)
    newest, folder = weights_of(run / "checkpoint-4"), (run / "checkpoint-4").stat().st_ino
    trainer = make_trainer(tiny_model_path, run, max_steps=4, learning_rate=5e-3, overwrite_output_dir=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(str(run / "checkpoint-2"))
    moved = [str(w.message) for w in caught if "moved the newer checkpoint(s) checkpoint-4" in str(w.message)]
    assert len(moved) == 1 and "previous-run-1" in moved[0]
    kept = run / "previous-run-1" / "checkpoint-4"  # the same folder, moved out of the new branch's way
    assert kept.stat().st_ino == folder and weights_of(kept) == newest and not checkpoint_problems(kept)
    assert (run / "checkpoint-4").stat().st_ino != folder and not checkpoint_problems(run / "checkpoint-4")


def test_resuming_an_older_run_into_a_newer_runs_output_dir_is_refused(tiny_model_path, four_step_run, tmp_path):
    run = copy_run(four_step_run, tmp_path)  # run B's checkpoints; run A's moved aside, as overwrite_output_dir does
    shutil.copytree(run / "checkpoint-2", run / "previous-run-1" / "checkpoint-2")
    newest = weights_of(run / "checkpoint-4")
    with pytest.raises(ValueError, match=r"previous-run-1/checkpoint-2 is at step 2, .*newer complete checkpoints "
                                         r"\(checkpoint-4\)"):
        make_trainer(tiny_model_path, run, max_steps=4).train(str(run / "previous-run-1" / "checkpoint-2"))
    assert weights_of(run / "checkpoint-4") == newest


def test_a_resume_past_max_steps_is_refused(four_step_run, tmp_path, capsys, no_model_load):
    run = copy_run(four_step_run, tmp_path)
    final = run / "model.safetensors"
    before = final.read_bytes() if final.exists() else None
    error = cli_error(capsys, "--model_name_or_path", str(tmp_path / "model"), "--dataset_name", data_file(tmp_path),
                      "--output_dir", str(run), "--resume_from_checkpoint", "true", "--max_steps", "2")
    assert "checkpoint-4 is at step 4, past max_steps = 2: there is nothing left to train" in error
    assert "--max_steps above 4" in error
    assert (final.read_bytes() if final.exists() else None) == before


@pytest.mark.parametrize("content", ['{"settings": null}', "[1, 2]", "{not json", None],
                         ids=["null-settings", "a-list", "invalid-json", "deleted"])
def test_an_unreadable_settings_record_means_settings_unknown_not_a_partial_checkpoint(
        tiny_model_path, finished_run, tmp_path, content):
    run = copy_run(finished_run, tmp_path)
    record = run / "checkpoint-2" / RUN_SETTINGS_FILE
    if content is None:
        record.unlink()
    else:
        record.write_text(content)
    assert checkpoint_problems(run / "checkpoint-2") == []  # complete: the record is a note, not resumable state
    trainer = make_trainer(tiny_model_path, run, max_steps=4, learning_rate=5e-3, fipo_decay_rate=64.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=True)
    unknown = [str(w.message) for w in caught if "settings it was trained with are unknown" in str(w.message)]
    assert len(unknown) == 1 and RUN_SETTINGS_FILE in unknown[0] and "cannot be checked" in unknown[0]
    assert trainer.state.global_step == 4 and (run / "checkpoint-4").is_dir()


def as_lora_checkpoint(checkpoint: Path) -> None:
    """The layout a --use_peft run saves: the adapter and its config, no whole model."""
    (checkpoint / "model.safetensors").rename(checkpoint / "adapter_model.safetensors")
    (checkpoint / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))


def test_a_lora_checkpoint_resumed_without_use_peft_names_the_flag_before_the_model_loads(
        finished_run, tmp_path, capsys, no_model_load):
    run = copy_run(finished_run, tmp_path)
    flags = ["--model_name_or_path", str(tmp_path / "model"), "--dataset_name", data_file(tmp_path), "--output_dir",
             str(run), "--resume_from_checkpoint", "true", "--max_steps", "4"]
    error = cli_error(capsys, *flags, "--use_peft", "--lora_target_modules", "q_proj")
    assert "holds the whole model, not a LoRA adapter: it was trained without --use_peft" in error
    assert "Fix: drop --use_peft" in error
    as_lora_checkpoint(run / "checkpoint-2")
    assert checkpoint_problems(run / "checkpoint-2") == []
    error = cli_error(capsys, *flags)
    assert "holds a LoRA adapter, not the whole model: it was trained with --use_peft. Fix: add --use_peft" in error


def test_train_names_the_layout_too(tiny_model_path, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    as_lora_checkpoint(run / "checkpoint-2")
    with pytest.raises(ValueError, match="holds a LoRA adapter, not the whole model.*Fix: add --use_peft"):
        make_trainer(tiny_model_path, run, max_steps=4).train(resume_from_checkpoint=True)


def test_a_move_that_cannot_be_made_is_named_before_anything_moves(finished_run, tmp_path, monkeypatch):
    import os

    from fipo_trl.safety.resume_checks import check_fresh_output_dir

    run = copy_run(finished_run, tmp_path)
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-4")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "checkpoint-4" and real_access(path, mode))
    with pytest.raises(ValueError, match=r"checkpoint-4 cannot be moved to .*previous-run-1 \(it or output_dir is not "
                                         r"writable\); nothing was moved"):
        check_fresh_output_dir(run, overwrite=True)
    assert (run / "checkpoint-2").is_dir() and not (run / "previous-run-1").exists()


def test_a_move_that_fails_halfway_says_where_the_old_run_now_lies(finished_run, tmp_path, monkeypatch):
    from fipo_trl.safety.resume_checks import check_fresh_output_dir

    run = copy_run(finished_run, tmp_path)
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-4")
    real_rename = Path.rename

    def rename(self, target):
        if self.name == "checkpoint-4":
            raise PermissionError(13, "Permission denied", str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(ValueError, match=r"moving .*checkpoint-4 to .*previous-run-1 failed \(.*Permission "
                                         r"denied.*\). Nothing was deleted: \['checkpoint-2'\] are now in "
                                         r".*previous-run-1, \['checkpoint-4'\] are still in"):
        check_fresh_output_dir(run, overwrite=True)
    assert (run / "previous-run-1" / "checkpoint-2").is_dir() and (run / "checkpoint-4").is_dir()


def test_a_streamed_dataset_shorter_than_a_generation_batch_is_an_error_not_a_run_of_0_steps(
        tiny_model_path, tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"prompt": "what is one plus one ?", "answer": "2"}) + "\n" for _ in range(1)))
    out = tmp_path / "out"  # one generation batch takes 2 prompts: (4 x 2 steps_per_generation) / 4 generations
    with pytest.raises(RuntimeError, match=r"training ran 0 optimizer steps \(from step 0\): the streamed "
                                           r"train_dataset ran out before one generation batch of prompts"):
        cli.main(["train", "--model_name_or_path", tiny_model_path, "--dataset_name", str(path),
                  "--dataset_streaming", "true", "--output_dir", str(out), "--max_steps", "2",
                  "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "4",
                  "--fipo_updates_per_generation", "2", "--reward_funcs", "fipo_trl.tools.tiny.digit_reward",
                  "--report_to", "none", "--bf16", "false"])
    assert not (out / "README.md").exists() and not (out / "model.safetensors").exists()
