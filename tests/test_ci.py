"""``.ci/run`` (issue 29 "The first hour", point 10): it lists the slowest tests, prints its total
time however it ends, and still fails on any non-zero step, pytest's exit 5 (no tests collected)
included. Its own header runs here before stand-in steps, so the trap is the one CI runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / ".ci/run").read_text(encoding="utf-8")


def header() -> str:
    """.ci/run up to and including its EXIT trap: the options and the timing every step runs under."""
    lines = SCRIPT.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("trap "))
    return "\n".join(lines[: end + 1])


def test_the_main_pytest_run_lists_the_slowest_tests():
    runs = [line for line in SCRIPT.splitlines() if line.startswith(".venv/bin/pytest")]
    assert runs == [".venv/bin/pytest -q --durations=15"]


@pytest.mark.parametrize(("step", "status"), [("true", 0), ("sh -c 'exit 5'", 5), ("false", 1)])
def test_the_run_prints_its_time_and_keeps_the_status_of_a_failing_step(tmp_path, step, status):
    script = tmp_path / "ci" / "run"
    script.parent.mkdir()
    script.write_text(f"{header()}\n{step}\necho after the step\n", encoding="utf-8")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stderr
    assert ("after the step" in done.stdout) == (status == 0)  # set -e: nothing runs after a failure
    assert re.fullmatch(rf"\.ci/run: \d+ s in all, exit status {status}\n", done.stderr), done.stderr
