"""Run TRL's own GRPO test file with FIPOTrainer swapped in, offline, and compare it test by test with plain TRL.

    git clone --depth 1 https://github.com/huggingface/trl /tmp/trl-source   # TRL's tests are not in its wheel
    python scripts/trl_grpo_suite.py --trl_source /tmp/trl-source --workdir /tmp/trl-suite

Each arm gets a scratch folder under --workdir with TRL's `tests/test_grpo_trainer.py` and `tests/testing_utils.py`,
TRL's `scripts/generate_zen_dataset.py`, and `scripts/trl_suite_conftest.py` as its conftest (the zen dataset and
the two tiny Qwen2 models built locally, so no Hub). The `fipo` arm differs from the `plain` one by one line: the
test file's `from trl import GRPOConfig, GRPOTrainer` imports FIPOConfig and FIPOTrainer under those names. Nothing
from TRL is copied into this repository.

Each arm's outcomes are kept in WORKDIR/ARM.json, so `--arms fipo` reruns one arm against the other's last result;
the comparison, with every test's outcome in both arms, goes to WORKDIR/comparison.json.
Exit status 0: every test that passes on plain TRL passes with FIPO (tests that fail on plain TRL, mostly for want
of other Hub models, are listed, not counted against FIPO).
"""

import argparse
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRL_IMPORT = "from trl import GRPOConfig, GRPOTrainer\n"
FIPO_IMPORT = "from fipo_trl import FIPOConfig as GRPOConfig, FIPOTrainer as GRPOTrainer\n"
TRL_FILES = {  # path in a TRL checkout -> path in the scratch folder
    "tests/test_grpo_trainer.py": "tests/test_grpo_trainer.py",
    "tests/testing_utils.py": "tests/testing_utils.py",
    "scripts/generate_zen_dataset.py": "generate_zen_dataset.py",
}
ARMS = ("plain", "fipo")


def swap_in_fipo(test_source: str) -> str:
    """TRL's test file with FIPOConfig and FIPOTrainer imported as GRPOConfig and GRPOTrainer."""
    count = test_source.splitlines(keepends=True).count(TRL_IMPORT)
    if count != 1:
        raise ValueError(f"expected the line {TRL_IMPORT.strip()!r} once in TRL's test file, found it {count} times: "
                         "this TRL checkout imports its trainer differently; update TRL_IMPORT in this script")
    return test_source.replace(TRL_IMPORT, FIPO_IMPORT)


def build_suite(trl_source: Path, folder: Path, arm: str) -> None:
    missing = [name for name in TRL_FILES if not (trl_source / name).is_file()]
    if missing:
        raise SystemExit(f"--trl_source {trl_source}: no {', '.join(missing)}; pass a clone of "
                         "https://github.com/huggingface/trl")
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "tests").mkdir(parents=True)
    for name, target in TRL_FILES.items():
        text = (trl_source / name).read_text()
        if name == "tests/test_grpo_trainer.py" and arm == "fipo":
            text = swap_in_fipo(text)
        (folder / target).write_text(text)
    (folder / "tests" / "__init__.py").write_text("")
    shutil.copy(HERE / "trl_suite_conftest.py", folder / "tests" / "conftest.py")
    (folder / "pytest.ini").write_text("[pytest]\ntestpaths = tests\n")


def read_junit(path: Path) -> dict[str, str]:
    """{test id: passed | failed | skipped} from pytest's JUnit XML (an error counts as failed)."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[test_id] = "failed"
        elif case.find("skipped") is not None:
            outcomes[test_id] = "skipped"
        else:
            outcomes[test_id] = "passed"
    return outcomes


def compare(plain: dict[str, str], fipo: dict[str, str]) -> dict:
    """What FIPO loses (passes on plain TRL, not with FIPO) and the counts of each arm."""
    return {
        "counts": {arm: dict(Counter(outcomes.values())) for arm, outcomes in (("plain", plain), ("fipo", fipo))},
        "lost_with_fipo": sorted(t for t, outcome in plain.items() if outcome == "passed" and fipo.get(t) != "passed"),
        "passed_only_with_fipo": sorted(t for t, outcome in fipo.items()
                                        if outcome == "passed" and plain.get(t) != "passed"),
        "failed_on_both": sorted(t for t, outcome in plain.items() if outcome == "failed" and fipo.get(t) == "failed"),
    }


def stack(trl_source: Path) -> dict:
    """What was tested: the TRL test file's commit (when --trl_source is a git clone) and the installed versions."""
    commit = subprocess.run(["git", "-C", str(trl_source), "rev-parse", "HEAD"], capture_output=True, text=True)
    return {"trl_tests_commit": commit.stdout.strip() or None,
            **{package: importlib.metadata.version(package) for package in ("trl", "transformers", "torch")}}


def run_arm(folder: Path, workers: int, keyword: str | None) -> dict[str, str]:
    junit = folder / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "tests/test_grpo_trainer.py"]
    if workers > 1:
        command[3:3] = ["-n", str(workers)]
    if keyword:
        command += ["-k", keyword]
    with open(folder / "pytest.log", "w") as log:
        subprocess.run(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, check=False)
    if not junit.is_file():
        raise SystemExit(f"pytest wrote no results for {folder.name}: see {folder / 'pytest.log'}")
    return read_junit(junit)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl_source", type=Path, required=True, help="a clone of github.com/huggingface/trl")
    parser.add_argument("--workdir", type=Path, default=Path("trl-grpo-suite"))
    parser.add_argument("--arms", nargs="*", choices=ARMS, default=list(ARMS),
                        help="the arms to run; none (`--arms` alone) only compares the saved outcomes")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist processes (1: no xdist)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression, to run part of the file")
    args = parser.parse_args(argv)
    if args.arms and args.workers > 1 and importlib.util.find_spec("xdist") is None:  # only a run needs xdist
        parser.error(f"--workers {args.workers} needs pytest-xdist: pip install pytest-xdist, or pass --workers 1")
    for arm in args.arms:
        folder = args.workdir / arm
        build_suite(args.trl_source, folder, arm)
        outcomes = run_arm(folder, args.workers, args.keyword)
        (args.workdir / f"{arm}.json").write_text(json.dumps(outcomes, indent=1, sort_keys=True))
        print(f"{arm}: {dict(Counter(outcomes.values()))} (log: {folder / 'pytest.log'})")
    results = {arm: args.workdir / f"{arm}.json" for arm in ARMS}
    if not all(path.is_file() for path in results.values()):
        if not args.arms:
            parser.error(f"nothing to compare: {args.workdir} has no saved outcomes of both arms; run them first")
        return 0
    plain, fipo = (json.loads(results[arm].read_text()) for arm in ARMS)
    report = {**stack(args.trl_source), **compare(plain, fipo),
              "outcomes": {test: {"plain": plain[test], "fipo": fipo.get(test)} for test in sorted(plain)}}
    (args.workdir / "comparison.json").write_text(json.dumps(report, indent=1))
    print("tested: " + ", ".join(f"{key} {report[key]}" for key in ("trl_tests_commit", "trl", "transformers")))
    for arm, counts in report["counts"].items():
        print(f"{arm:>5}: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("passed", "failed", "skipped")))
    print(f"failed on both arms: {len(report['failed_on_both'])}")
    for label in ("lost_with_fipo", "passed_only_with_fipo"):
        print(f"{label}: {len(report[label])}" + "".join(f"\n  {test}" for test in report[label]))
    return 1 if report["lost_with_fipo"] else 0


if __name__ == "__main__":
    sys.exit(main())
