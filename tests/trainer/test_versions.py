"""The supported TRL stack: declared once in pyproject.toml, checked when fipo_trl.config is imported (one clear
error before any model loads), and Liger's fused-loss path of older TRL refused when the config is built."""

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import trl

import fipo_trl.safety.versions as versions
from fipo_trl import FIPOConfig

ROOT = Path(__file__).resolve().parents[2]


def declared_range(package):
    """The requirement pyproject.toml declares for ``package`` (e.g. 'trl>=1.9,<1.17'), read here independently."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(line for line in dependencies if line.split("<")[0].split(">")[0].split("=")[0] == package)


@pytest.mark.parametrize("package", versions.CHECKED_PACKAGES)
def test_the_range_is_pyprojects(package):
    assert versions.supported_range(package).replace(" ", "") == declared_range(package).replace(" ", "")


def test_the_installed_stack_is_inside_the_range():
    assert versions.version_problems() == []


def fake_versions(monkeypatch, **fake):
    real = importlib.metadata.version
    monkeypatch.setattr(versions.importlib.metadata, "version", lambda name: fake.get(name) or real(name))


@pytest.mark.parametrize("trl_version", ["1.8.0", "1.17.0", "2.0.0.dev0", "0.29.1"])
def test_a_trl_outside_the_range_gets_one_error_with_version_range_and_fix(monkeypatch, trl_version):
    fake_versions(monkeypatch, trl=trl_version)
    with pytest.raises(ImportError) as error:
        versions.check_installed_versions()
    message = str(error.value)
    trl_range = versions.supported_range("trl")
    assert f"trl {trl_version} is installed" in message
    assert f"supports {trl_range}" in message and f"Fix: pip install '{trl_range}'" in message


def test_every_package_outside_its_range_is_named_in_the_same_error(monkeypatch):
    fake_versions(monkeypatch, trl="1.8.0", transformers="4.50.0")
    with pytest.raises(ImportError, match=r"trl 1\.8\.0 is installed.*transformers 4\.50\.0 is installed.*"
                                          r"Fix: pip install 'trl>=.*' 'transformers>=.*'"):
        versions.check_installed_versions()


def test_the_edges_of_the_range_are_accepted(monkeypatch):
    lower = {package: str(next(s for s in versions._requirements()[package].specifier if s.operator == ">=").version)
             for package in versions.CHECKED_PACKAGES}
    fake_versions(monkeypatch, **lower)
    assert versions.version_problems() == []


@pytest.mark.slow
def test_importing_the_config_with_an_unsupported_trl_fails_before_anything_loads(tmp_path):
    """A trl 1.0.0 whose metadata comes first on sys.path: importing fipo_trl.config stops with the one error."""
    dist = tmp_path / "trl-1.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: trl\nVersion: 1.0.0\n")
    code = "import fipo_trl.config"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)}, timeout=300)
    assert result.returncode != 0
    assert f"ImportError: fipo_trl cannot run with the installed versions: trl 1.0.0 is installed; fipo_trl " \
           f"supports {versions.supported_range('trl')}" in result.stderr


# --- Liger's fused GRPO loss (TRL <= 1.13) -------------------------------------------------------------------------


def test_liger_loss_path_of_older_trl_is_refused_when_the_config_is_built(tmp_path, monkeypatch):
    """TRL <= 1.13 has GRPOTrainer.compute_liger_loss, which computes the loss past FIPO's hook. On such a TRL (the
    oldest-stack CI run has one; elsewhere it is simulated) use_liger_kernel=True fails at FIPOConfig, with the fix."""
    if not hasattr(trl.GRPOTrainer, "compute_liger_loss"):
        monkeypatch.setattr(trl.GRPOTrainer, "compute_liger_loss", lambda self, *a: None, raising=False)
    with pytest.raises(ValueError, match=rf"`use_liger_kernel=True` cannot be used with TRL {trl.__version__}: .*"
                                         r"Fix: set use_liger_kernel=False, or upgrade TRL to 1\.14"):
        FIPOConfig(output_dir=str(tmp_path), use_liger_kernel=True, bf16=False, report_to="none")
    assert FIPOConfig(output_dir=str(tmp_path), bf16=False, report_to="none").use_liger_kernel is False


def test_liger_layers_of_newer_trl_are_not_refused_by_the_loss_path_check(tmp_path, monkeypatch):
    """Where TRL has no Liger loss path, the loss-path check lets use_liger_kernel through (other checks, e.g. a
    CPU-only machine, may still refuse it)."""
    from fipo_trl.config import check_liger_loss_path

    monkeypatch.delattr(trl.GRPOTrainer, "compute_liger_loss", raising=False)
    args = FIPOConfig(output_dir=str(tmp_path), bf16=False, report_to="none")
    args.use_liger_kernel = True
    check_liger_loss_path(args)  # no error


def test_luspo_is_refused_on_trl_before_1_10(tmp_path, monkeypatch):
    """TRL 1.9 averages LUSPO's loss over padding once advantages are per token: FIPOConfig refuses it there."""
    if not versions.trl_older_than("1.10"):
        fake_versions(monkeypatch, trl="1.9.2")
    with pytest.raises(ValueError, match=r"`loss_type` = 'luspo' needs TRL 1\.10 or later with FIPO: TRL 1\.9\.\d .*"
                                         r"Fix: upgrade TRL to 1\.10 or later .* or use another loss_type"):
        FIPOConfig(output_dir=str(tmp_path), loss_type="luspo", importance_sampling_level="sequence", bf16=False,
                   report_to="none")
