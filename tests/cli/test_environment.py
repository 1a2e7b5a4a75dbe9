"""`fipo-trl` and the FIPO_TRL_* environment variables: a bad value is one error line before anything loads, and
FIPO_TRL_TRACEBACK takes the yes/no words people write."""

import pytest

from fipo_trl.tools import cli


@pytest.mark.parametrize("command", [["eval", "--k", "2"], ["train", "--max_steps", "1"]])
def test_a_bad_variable_is_one_error_line_before_anything_loads(monkeypatch, capsys, command):
    monkeypatch.setenv("FIPO_TRL_CC_TIMEOUT", "inf")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(command)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["fipo-trl: error: environment variable FIPO_TRL_CC_TIMEOUT='inf' is invalid: it takes a number "
                     "of seconds > 0 and <= 86400 (default 120). Fix: set it to one of those, or unset it "
                     "(docs/environment.md)."]


@pytest.mark.parametrize(("value", "full"), [("yes", True), ("TRUE", True), ("on", True), ("1", True), ("off", False),
                                             ("No", False), ("0", False), ("", False)])
def test_traceback_takes_yes_and_no_words(monkeypatch, capsys, value, full):
    monkeypatch.setenv("FIPO_TRL_TRACEBACK", value)
    if full:
        with pytest.raises(ValueError, match="--k 0"):  # the exception itself: its traceback is shown
            cli.main(["eval", "--k", "0"])
    else:
        with pytest.raises(SystemExit):
            cli.main(["eval", "--k", "0"])
        assert capsys.readouterr().err.strip().startswith("fipo-trl: error: --k 0")


def test_a_bad_traceback_value_is_reported_itself(monkeypatch, capsys):
    monkeypatch.setenv("FIPO_TRL_TRACEBACK", "sometimes")
    with pytest.raises(SystemExit):
        cli.main(["eval", "--k", "0"])
    error = capsys.readouterr().err
    assert "FIPO_TRL_TRACEBACK='sometimes' is invalid: it takes 1/true/yes/on or 0/false/no/off" in error
