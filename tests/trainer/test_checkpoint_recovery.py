"""Checkpoints cut short by a kill or a full disk: resuming uses the newest complete one (fipo_trl/safety/).

The slow tests SIGKILL real training processes during a checkpoint save; this file is also their child process
(``python tests/trainer/test_checkpoint_recovery.py <model> <output_dir> ...``, see ``child_main``).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fipo_trl.safety.checkpoint_files import (
    checkpoint_problems,
    is_model_only,
    list_checkpoints,
    newest_complete_checkpoint,
    saving_marker,
)
from fipo_trl.safety.resume import resolve_resume, set_aside_incomplete

HERE = Path(__file__).resolve()


# --- A small FIPO run (2 updates per generation batch, checkpoints every 2 steps on generation boundaries, so a
# resumed run equals an uninterrupted one, as in tests/trainer/test_resume.py) ----------------------------------------

def make_trainer(model_path, output_dir, **overrides):
    from fipo_trl import FIPOConfig, FIPOTrainer
    from fipo_trl.tools.tiny import digit_reward, tiny_prompt_dataset

    settings = dict(output_dir=str(output_dir), bf16=False, per_device_train_batch_size=4, num_generations=4,
                    max_completion_length=8, max_steps=6, learning_rate=1e-2, fipo_updates_per_generation=2,
                    report_to="none", logging_steps=1, save_strategy="steps", save_steps=2,
                    gradient_checkpointing=False, seed=0, disable_tqdm=True)
    return FIPOTrainer(model=model_path, reward_funcs=digit_reward, args=FIPOConfig(**{**settings, **overrides}),
                       train_dataset=tiny_prompt_dataset(32))


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


class Killed(BaseException):
    """Stands in for a SIGKILL in the in-process tests: nothing of fipo_trl's handles it."""


def fail_during_save(trainer, method: str, step: int, error: BaseException, when: str = "after"):
    """Make ``trainer.<method>`` (a step of transformers' _save_checkpoint) raise ``error`` at the save of ``step``."""
    original = getattr(trainer, method)

    def wrapped(*args, **kwargs):
        hit = trainer.state.global_step == step
        if hit and when == "before":
            raise error
        result = original(*args, **kwargs)
        if hit:
            raise error
        return result

    setattr(trainer, method, wrapped)


@pytest.fixture(scope="module")
def reference(tiny_model_path, tmp_path_factory):
    """An uninterrupted 6-step run: its losses, parameters, and complete checkpoint-2/4/6."""
    output_dir = tmp_path_factory.mktemp("reference")
    trainer = make_trainer(tiny_model_path, output_dir)
    trainer.train()
    return {"dir": output_dir, "losses": losses(trainer),
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}}


def copy_run(reference, tmp_path, keep=("checkpoint-2", "checkpoint-4")) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    for name in keep:
        shutil.copytree(reference["dir"] / name, run / name)
    return run


def assert_matches_reference(trainer_or_final, reference):
    if isinstance(trainer_or_final, dict):
        got_losses, params = trainer_or_final["losses"], trainer_or_final["params"]
    else:
        got_losses = losses(trainer_or_final)
        params = dict(trainer_or_final.model.named_parameters())
    assert got_losses == reference["losses"]
    for name, param in reference["params"].items():
        torch.testing.assert_close(params[name].detach(), param, rtol=0, atol=1e-6, msg=name)


# --- What a complete checkpoint is --------------------------------------------------------------------------------

def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {  # name: (how to damage checkpoint-4, text expected among its problems)
    "no trainer_state": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "cut trainer_state": (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json is unreadable"),
    "no weights": (lambda c: (c / "model.safetensors").unlink(), "no model weights"),
    "cut weights": (lambda c: truncate(c / "model.safetensors"), "model.safetensors is truncated"),
    "no optimizer": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "cut optimizer": (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt is truncated"),
    "no scheduler": (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    "no rng": (lambda c: (c / "rng_state.pth").unlink(), "rng_state.pth is missing"),
    "cut rng": (lambda c: truncate(c / "rng_state.pth"), "rng_state.pth is truncated"),
    "save marker": (lambda c: saving_marker(c).write_text("saving"), "its save never finished"),
    "cut config": (lambda c: truncate(c / "config.json"), "config.json is unreadable"),
}


def test_a_saved_checkpoint_is_complete(reference):
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):
        assert checkpoint_problems(reference["dir"] / name) == [], name
    assert not list(reference["dir"].glob("_saving_*"))  # every save cleared its marker


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_missing_or_cut_file_makes_the_checkpoint_partial_and_resume_skips_it(reference, tmp_path, damage):
    run = copy_run(reference, tmp_path)
    apply, expected = DAMAGES[damage]
    apply(run / "checkpoint-4")
    problems = checkpoint_problems(run / "checkpoint-4")
    assert any(expected in p for p in problems), problems
    for resume in (True, "true", "True", str(run / "checkpoint-4")):  # also the path get_last_checkpoint returns
        chosen, messages = resolve_resume(resume, run)
        assert chosen == str(run / "checkpoint-2")
        assert len(messages) == 1 and "checkpoint-4" in messages[0] and expected in messages[0]
        assert "Resuming from" in messages[0] and "checkpoint-2" in messages[0]


def test_sharded_adapter_and_model_only_checkpoints(reference, tmp_path):
    from safetensors.torch import load_file, save_file

    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(reference["dir"] / "checkpoint-4", checkpoint)
    tensors = load_file(checkpoint / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, checkpoint / shard)
    index = {"metadata": {}, "weight_map": {n: s for s, ns in shards.items() for n in ns}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    (checkpoint / "model.safetensors").unlink()
    assert checkpoint_problems(checkpoint) == []
    truncate(checkpoint / "model-00002-of-00002.safetensors")
    assert any("model-00002-of-00002.safetensors is truncated" in p for p in checkpoint_problems(checkpoint))
    (checkpoint / "model-00002-of-00002.safetensors").unlink()
    assert any("shard model-00002-of-00002.safetensors is missing" in p for p in checkpoint_problems(checkpoint))

    adapter = tmp_path / "adapter" / "checkpoint-4"  # LoRA: adapter weights only
    shutil.copytree(reference["dir"] / "checkpoint-4", adapter)
    (adapter / "model.safetensors").rename(adapter / "adapter_model.safetensors")
    assert checkpoint_problems(adapter) == []

    model_only = tmp_path / "model-only" / "checkpoint-4"  # save_only_model=True: no optimizer, scheduler, RNG
    shutil.copytree(reference["dir"] / "checkpoint-4", model_only)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (model_only / name).unlink()
    assert checkpoint_problems(model_only, training_state=False) == []
    assert is_model_only(checkpoint_problems(model_only))  # a finished model-only save, not a partial one
    (model_only / "scheduler.pt").write_bytes(b"")  # but one training-state file: a save cut short
    assert len(checkpoint_problems(model_only)) == 3


def test_resume_errors_name_the_flag_and_the_fix(reference, tmp_path):
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=True.*holds no checkpoint.*Fix: set --output_dir"):
        resolve_resume(True, tmp_path / "empty")
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=.*nowhere.*does not exist.*Fix"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    run = copy_run(reference, tmp_path)
    for name in ("checkpoint-2", "checkpoint-4"):
        (run / name / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=r"no complete checkpoint.*checkpoint-4.*checkpoint-2.*Fix"):
        resolve_resume(True, run)
    assert resolve_resume(None, run) == (None, []) and resolve_resume("false", run) == (None, [])


def test_partial_checkpoints_newer_than_the_resume_point_are_set_aside_not_deleted(reference, tmp_path):
    run = copy_run(reference, tmp_path, keep=("checkpoint-2", "checkpoint-4", "checkpoint-6"))
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-1")
    (run / "checkpoint-1" / "optimizer.pt").unlink()  # partial but older: not in the way, left alone
    saving_marker(run / "checkpoint-6").write_text("saving")
    (run / "checkpoint-4" / "rng_state.pth").unlink()
    saving_marker(run / "checkpoint-8").write_text("saving")  # killed before its folder existed
    messages = set_aside_incomplete(run, after_step=2)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1", "checkpoint-2"]
    assert (run / "incomplete-checkpoint-4" / "model.safetensors").is_file()  # kept for inspection
    assert (run / "incomplete-checkpoint-6").is_dir() and not list(run.glob("_saving_*"))
    assert len(messages) == 2 and "incomplete-checkpoint-4" in messages[0]


# --- Interrupted saves in process: a full disk, a save over an older complete checkpoint, rotation ---------------

def test_full_disk_during_the_optimizer_save(tiny_model_path, reference, tmp_path):
    run = tmp_path / "run"
    trainer = make_trainer(tiny_model_path, run)

    def write_half_then_fail(output_dir):
        (Path(output_dir) / "optimizer.pt").write_bytes(b"PK\x03\x04 half an optimizer")
        raise OSError(errno.ENOSPC, "No space left on device")

    trainer._save_optimizer_and_scheduler = lambda output_dir: (
        write_half_then_fail(output_dir) if trainer.state.global_step == 4 else
        type(trainer)._save_optimizer_and_scheduler(trainer, output_dir))
    with pytest.raises(OSError, match="No space left on device") as caught:
        trainer.train()
    note = "\n".join(caught.value.__notes__)
    assert "checkpoint-4 failed" in note and "checkpoint-2" in note and "--resume_from_checkpoint true" in note
    assert "_save_checkpoint" not in vars(trainer)  # the guard is gone after train
    assert any("optimizer.pt is truncated" in p for p in checkpoint_problems(run / "checkpoint-4"))

    resumed = make_trainer(tiny_model_path, run)
    with pytest.warns(UserWarning, match=r"skipping the partial checkpoint .*checkpoint-4"):
        resumed.train(resume_from_checkpoint=True)
    assert_matches_reference(resumed, reference)
    assert checkpoint_problems(run / "checkpoint-4") == [] and (run / "incomplete-checkpoint-4").is_dir()


def test_full_disk_while_writing_trainer_state(tiny_model_path, reference, tmp_path, monkeypatch):
    from transformers import TrainerState

    run = tmp_path / "run"
    save_to_json = TrainerState.save_to_json

    def cut_short(self, json_path):
        if self.global_step != 4:
            return save_to_json(self, json_path)
        Path(json_path).write_text('{"global_step": 4, "log_hist')
        raise OSError(errno.ENOSPC, "No space left on device", json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", cut_short)
    with pytest.raises(OSError, match="No space left"):
        make_trainer(tiny_model_path, run).train()
    monkeypatch.setattr(TrainerState, "save_to_json", save_to_json)
    chosen, messages = resolve_resume(True, run)
    assert chosen == str(run / "checkpoint-2") and "trainer_state.json is unreadable" in messages[0]
    resumed = make_trainer(tiny_model_path, run)
    with pytest.warns(UserWarning, match="checkpoint-4"):
        resumed.train(resume_from_checkpoint=True)
    assert_matches_reference(resumed, reference)


def test_a_save_cut_short_over_an_older_complete_checkpoint_is_not_taken_for_complete(
        tiny_model_path, reference, tmp_path, monkeypatch):
    """A save over an existing checkpoint-4, cut short after the new weights: the folder still has the old
    trainer_state.json and optimizer. Only the save marker tells it is partial. (A resume from checkpoint-2 no
    longer saves over a newer complete checkpoint: it is refused, or the newer one moved aside, see
    test_run_safety.py; the guard is switched off here to produce such a folder.)"""
    import fipo_trl.safety.resume

    run = copy_run(reference, tmp_path)
    trainer = make_trainer(tiny_model_path, run)
    fail_during_save(trainer, "save_model", 4, Killed())
    with monkeypatch.context() as patch:
        patch.setattr(fipo_trl.safety.resume, "check_resume_target", lambda *args: [])
        with pytest.raises(Killed):
            trainer.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    assert (run / "checkpoint-4" / "trainer_state.json").is_file()  # the stale one
    assert checkpoint_problems(run / "checkpoint-4") == [
        "its save never finished (_saving_checkpoint-4 is still there)"]
    resumed = make_trainer(tiny_model_path, run)
    with pytest.warns(UserWarning, match=r"skipping the partial .*checkpoint-4.*Resuming from .*checkpoint-2"):
        resumed.train(resume_from_checkpoint=True)
    assert_matches_reference(resumed, reference)


def test_rotation_never_keeps_a_partial_checkpoint_over_the_complete_ones(tiny_model_path, reference, tmp_path):
    """save_total_limit=1 keeps the newest checkpoint. A partial checkpoint-8 left by a killed run is set aside at
    resume, so rotation keeps the fresh, complete checkpoint-4 (transformers alone would keep checkpoint-8 when it
    orders by step, and delete every complete one)."""
    run = copy_run(reference, tmp_path, keep=("checkpoint-2",))
    shutil.copytree(reference["dir"] / "checkpoint-4", run / "checkpoint-8")
    (run / "checkpoint-8" / "trainer_state.json").unlink()
    trainer = make_trainer(tiny_model_path, run, max_steps=4, save_total_limit=1)
    with pytest.warns(UserWarning, match="checkpoint-8"):
        trainer.train(resume_from_checkpoint=True)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-4"]
    assert checkpoint_problems(run / "checkpoint-4") == [] and (run / "incomplete-checkpoint-8").is_dir()


def test_the_guard_fails_loudly_if_transformers_stops_saving_where_expected(tiny_model_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tmp_path / "run", max_steps=2)
    trainer._save_checkpoint = lambda model, trial: None  # a transformers that saves elsewhere (or not at all)
    with pytest.raises(RuntimeError, match="checkpoint guard relies on transformers' Trainer._save_checkpoint"):
        trainer.train()


# --- SIGKILL during real saves (subprocesses) --------------------------------------------------------------------

KILL_POINTS = [  # where in the save of checkpoint-4 the process SIGKILLs itself
    "save_model:before",  # only the marker exists
    "save_model:truncated",  # weights half written
    "save_model:after",
    "_save_optimizer_and_scheduler:after",
    "_save_rng_state:after",
    "trainer_state:truncated",  # trainer_state.json half written
    "trainer_state:after",  # every file written, the save not finished (rotation, marker)
]


def child(*args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "always::UserWarning"}
    return subprocess.run([sys.executable, str(HERE), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def final(output_dir):
    return torch.load(Path(output_dir) / "final.pt")


@pytest.fixture(scope="module")
def child_reference(tiny_model_path, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("child-reference")
    result = child(tiny_model_path, output_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return final(output_dir)


def check_resume_finishes(tiny_model_path, run, child_reference):
    """Resume with `true` from whatever a kill left: the newest complete checkpoint is used, partial ones named."""
    expected, skipped = newest_complete_checkpoint(run)
    resumed = child(tiny_model_path, run, "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for path, _ in skipped:
        assert f"skipping the partial checkpoint {path}" in resumed.stderr
        assert f"Resuming from {expected}" in resumed.stderr
    assert_matches_reference(final(run), child_reference)  # both resume points are generation boundaries
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert all(checkpoint_problems(p) == [] for p in list_checkpoints(run))
    return expected, skipped


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_during_a_save_then_resume_true(tiny_model_path, child_reference, tmp_path, point):
    run = tmp_path / "run"
    killed = child(tiny_model_path, run, "--kill_at", point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert saving_marker(run / "checkpoint-4").exists() and not (run / "final.pt").exists()
    assert checkpoint_problems(run / "checkpoint-2") == [] and checkpoint_problems(run / "checkpoint-4") != []
    expected, skipped = check_resume_finishes(tiny_model_path, run, child_reference)
    assert expected == run / "checkpoint-2"
    assert [p.name for p, _ in skipped] == ([] if point == "save_model:before" else ["checkpoint-4"])


@pytest.mark.slow
def test_sigkill_at_many_moments_of_a_slow_save_then_resume_true(tiny_model_path, child_reference, tmp_path):
    """The parent kills the child `delay` seconds after the save of checkpoint-4 starts (each of the save's four
    steps sleeps 0.15 s first): whatever each kill leaves, resuming picks the newest complete checkpoint, names the
    partial one it skips, and finishes exactly like an uninterrupted run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outcomes = {}
    for delay in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9, 1.2):
        run = tmp_path / f"run-{delay}"
        process = subprocess.Popen([sys.executable, str(HERE), tiny_model_path, str(run), "--save_delay", "0.15"],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while not saving_marker(run / "checkpoint-4").exists():
                assert process.poll() is None and time.monotonic() < deadline, "the save of checkpoint-4 never began"
                time.sleep(0.002)
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
        left = sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint-", "_saving_")))
        if process.returncode == 0:  # finished before the kill: nothing to resume (see test_resume.py for that)
            outcomes[delay] = (left, "finished", [])
            continue
        expected, skipped = check_resume_finishes(tiny_model_path, run, child_reference)
        outcomes[delay] = (left, expected.name, [p.name for p, _ in skipped])
    print("\n".join(f"kill {d:.1f} s into the save: left {o[0]}, resumed from {o[1]}, skipped {o[2]}"
                    for d, o in outcomes.items()))
    assert outcomes[0.0][1] == "checkpoint-2"  # killed inside the save
    assert len({tuple(left) for left, _, _ in outcomes.values()}) >= 3  # the kills hit different moments


@pytest.mark.slow
def test_cli_resume_true_skips_a_partial_checkpoint(tmp_path):
    """`fipo-trl train --resume_from_checkpoint true` (the flag arrives as the string "true")."""
    flags = ["--output_dir", tmp_path / "run", "--max_steps", 4, "--save_steps", 2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "fipo_trl.tools.cli", "train", *map(str, [*flags, *extra])],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / "run" / "checkpoint-4" / "optimizer.pt").write_bytes(b"PK\x03\x04")  # as if the disk filled up
    resumed = run("--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping the partial checkpoint" in resumed.stderr and "checkpoint-4 (optimizer.pt is truncated" in \
        resumed.stderr
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and checkpoint_problems(tmp_path / "run" / "checkpoint-4") == []
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]  # 1-2 restored, 3-4 retrained


# --- The child process ---------------------------------------------------------------------------------------------

def child_main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_path")
    parser.add_argument("output_dir")
    parser.add_argument("--kill_at", help="one of KILL_POINTS: SIGKILL there during the save of checkpoint-4")
    parser.add_argument("--save_delay", type=float, default=0.0, help="sleep before each step of every save")
    parser.add_argument("--resume")
    cli = parser.parse_args()
    from transformers import TrainerState

    trainer = make_trainer(cli.model_path, cli.output_dir)

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as if the machine was pre-empted

    def wrap(owner, name, is_method_of_class=False):
        original = getattr(owner, name)
        target, when = (cli.kill_at or ":").split(":")
        point = name if name != "save_to_json" else "trainer_state"

        def wrapped(*args, **kwargs):
            step = (args[0] if is_method_of_class else trainer.state).global_step
            time.sleep(cli.save_delay)
            if step == 4 and target == point and when == "before":
                kill()
            if step == 4 and target == point and when == "truncated":
                original(*args, **kwargs)
                path = Path(args[0]) / "model.safetensors" if name == "save_model" else Path(args[-1])
                truncate(path)
                kill()
            result = original(*args, **kwargs)
            if step == 4 and target == point and when == "after":
                kill()
            return result

        setattr(owner, name, wrapped)

    for name in ("save_model", "_save_optimizer_and_scheduler", "_save_rng_state"):
        wrap(trainer, name)
    wrap(TrainerState, "save_to_json", is_method_of_class=True)
    trainer.train(resume_from_checkpoint=cli.resume)
    torch.save({"losses": losses(trainer), "params": {n: p.detach() for n, p in trainer.model.named_parameters()}},
               Path(cli.output_dir) / "final.pt")


if __name__ == "__main__":
    child_main()


def test_a_planted_dcp_metadata_pickle_never_runs(tmp_path):
    """FSDP's sharded checkpoints keep their shard index in a pickle (.metadata): it is read with an unpickler that
    admits only the metadata's own classes, so a planted file is refused, never run."""
    import os
    import pickle

    from fipo_trl.safety.shard_files import dcp_problems

    class Planted:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    folder = tmp_path / "pytorch_model_fsdp_0"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(Planted()))
    assert dcp_problems(folder) == ["pytorch_model_fsdp_0/.metadata is unreadable (truncated, or not a checkpoint's "
                                    "metadata)"]
    assert not (tmp_path / "ran").exists()
