"""``kvorch submit``'s common mistakes are refused before torch, transformers or Ray is imported
(issue 39, point 6: a typo in --methods or a missing corpus once took 5-13 s to be told), and
the names ``--methods`` accepts before the import are exactly the registry's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.sweep.method_names import declared_names

PROBE = """
import sys
from click.testing import CliRunner
from orchestrator.cli import main
result = CliRunner().invoke(main, sys.argv[1:])
print(result.exit_code)
print(result.output.strip().splitlines()[-1] if result.output.strip() else repr(result.exception))
print(sorted(m for m in ("torch", "transformers", "ray") if m in sys.modules))
"""


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "nope"], "--methods: unknown method 'nope'; valid methods: baseline, window"),
        (["--methods", "knorm,h2o:protected_window=8,snapk"], "--methods: unknown method 'snapk'"),
        (["--corpus", "no-such-corpus.jsonl"], "--corpus no-such-corpus.jsonl not found: pass 'pydoc'"),
        (["--corpus", "notes.txt"], "--corpus notes.txt: unsupported file type '.txt'"),
        (["--task", "nope"], "--task 'nope' is unknown"),
    ],
)
def test_a_bad_submit_is_refused_before_torch_is_imported(tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("not a corpus")
    argv = [sys.executable, "-c", PROBE, "submit", *args, "--lake", str(tmp_path / "lake")]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    code, line, heavy = done.stdout.strip().splitlines()[-3:]
    assert code == "1" and message in line, done.stdout + done.stderr
    assert heavy == "[]", f"imported {heavy} before refusing: {line}"
    assert not (tmp_path / "lake").exists()


def test_the_names_read_from_the_press_files_are_the_registrys():
    """An independent reference: the registry as importing every press fills it."""
    from workers.presses import REGISTRY

    assert declared_names() == frozenset(REGISTRY)
