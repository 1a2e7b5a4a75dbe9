"""The FIPO_TRL_* environment variables (kernels/env.py): a value that is not understood is an error naming the
variable and what it accepts, never the default in silence; yes/no variables take the words people write."""

from pathlib import Path

import pytest
from kernel_utils import needs_c_kernel, random_batch

from fipo_trl import fipo_loss
from fipo_trl.kernels import env, fipo_cpu, fipo_triton

YES_NO = [("FIPO_TRL_CPU_KERNEL", env.cpu_kernel_enabled, True), ("FIPO_TRL_TRACEBACK", env.show_traceback, False)]


@pytest.fixture
def fresh_loader():
    """The C kernel's loader reads the environment once per process: forget its result around the test."""
    fipo_cpu._library.cache_clear()
    yield
    fipo_cpu._library.cache_clear()


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "abc", "0", "-5", "1e12", "12s"])
def test_a_bad_compiler_timeout_is_an_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("FIPO_TRL_CC_TIMEOUT", value)
    with pytest.raises(ValueError, match=r"FIPO_TRL_CC_TIMEOUT='.*' is invalid: it takes a number of seconds > 0 "
                                         r"and <= 86400 \(default 120\)"):
        env.cc_timeout()


@pytest.mark.parametrize(("value", "seconds"), [("", 120.0), ("  ", 120.0), ("300", 300.0), (" 0.5 ", 0.5)])
def test_a_good_compiler_timeout_is_read(monkeypatch, value, seconds):
    monkeypatch.setenv("FIPO_TRL_CC_TIMEOUT", value)
    assert env.cc_timeout() == seconds


@needs_c_kernel
def test_fipo_loss_names_a_bad_timeout_and_runs_with_a_good_one(monkeypatch, fresh_loader):
    """FIPO_TRL_CC_TIMEOUT=inf used to break every fipo_loss call with an OverflowError, nan with "cannot convert
    float NaN to integer"; abc was replaced by the default."""
    batch = random_batch(2, 8, seed=0)
    for value in ("inf", "nan", "abc"):
        monkeypatch.setenv("FIPO_TRL_CC_TIMEOUT", value)
        with pytest.raises(ValueError, match="FIPO_TRL_CC_TIMEOUT"):
            fipo_loss(*batch)
    monkeypatch.setenv("FIPO_TRL_CC_TIMEOUT", "300")
    assert fipo_loss(*batch).backend != "torch"  # the C kernel (from the cache)


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "Yes", "on", " On "])
def test_yes_no_variables_take_every_yes(monkeypatch, value):
    for name, read, _ in YES_NO:
        monkeypatch.setenv(name, value)
        assert read() is True


@pytest.mark.parametrize("value", ["0", "false", "False", "NO", "off"])
def test_yes_no_variables_take_every_no(monkeypatch, value):
    for name, read, _ in YES_NO:
        monkeypatch.setenv(name, value)
        assert read() is False


def test_yes_no_variables_unset_or_empty_keep_their_default(monkeypatch):
    for name, read, default in YES_NO:
        monkeypatch.delenv(name, raising=False)
        assert read() is default
        monkeypatch.setenv(name, "")
        assert read() is default


@pytest.mark.parametrize("value", ["2", "maybe", "enabled", "y", "-1"])
def test_yes_no_variables_refuse_anything_else(monkeypatch, value):
    for name, read, _ in YES_NO:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=f"{name}='{value}' is invalid: it takes 1/true/yes/on or "
                                             "0/false/no/off"):
            read()


def test_cpu_kernel_off_in_words_takes_the_torch_path(monkeypatch, fresh_loader):
    monkeypatch.setenv("FIPO_TRL_CPU_KERNEL", "Off")
    assert fipo_loss(*random_batch(2, 8, seed=0)).backend == "torch"
    assert fipo_cpu.c_kernel_status() == "disabled by FIPO_TRL_CPU_KERNEL=Off"


def test_triton_variant_and_cache_folder(monkeypatch):
    monkeypatch.setenv("FIPO_TRL_TRITON_VARIANT", "Chunk")
    assert env.triton_variant() == "chunk" and fipo_triton.VARIANTS == env.TRITON_VARIANTS
    monkeypatch.setenv("FIPO_TRL_TRITON_VARIANT", "fast")
    with pytest.raises(ValueError, match="FIPO_TRL_TRITON_VARIANT='fast' is invalid: it takes one of auto/row/chunk"):
        env.triton_variant()
    monkeypatch.setenv("FIPO_TRL_CACHE", "~/kernels")
    assert env.cache_dir() == Path.home() / "kernels"
    monkeypatch.setenv("FIPO_TRL_CACHE", "")
    assert env.cache_dir() is None


def test_check_environment_raises_for_a_bad_value_and_warns_about_an_unknown_name(monkeypatch):
    monkeypatch.setenv("FIPO_TRL_CPU_KERNELS", "0")  # a typo of FIPO_TRL_CPU_KERNEL
    with pytest.warns(UserWarning, match="FIPO_TRL_CPU_KERNELS is not one fipo_trl reads.*FIPO_TRL_CPU_KERNEL,"):
        env.check_environment()
    monkeypatch.setenv("FIPO_TRL_TRACEBACK", "sometimes")
    with pytest.raises(ValueError, match="FIPO_TRL_TRACEBACK"):
        env.check_environment()
