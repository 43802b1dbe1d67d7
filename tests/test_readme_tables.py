"""The docs' printed tables are what the commands print (issue 39, point 8: the README's --wide
table once differed from the command's output in the 4th digit of 5 rows).
tests/readme_tables.py regenerates them; these tests hold it to that."""

from __future__ import annotations

import shlex
import subprocess
import sys

from tests.readme_tables import PAGES, ROOT, marked_blocks, printed, regenerate
from tests.test_lake_and_report import lake  # noqa: F401 - the two-config lake fixture, shared
from tests.test_readme import kvorch_path


def test_every_marked_block_names_a_kvorch_command_that_parses():
    blocks = [b for page in PAGES for b in marked_blocks(page)]
    assert {(b.page.name, b.command) for b in blocks} >= {
        ("README.md", "kvorch report"),
        ("reports.md", "kvorch report --wide"),
    }
    for block in blocks:
        kvorch_path([*shlex.split(block.command)[1:], "--lake", "x"])


def test_a_stale_block_is_found_and_rewritten_to_the_commands_output(tmp_path, lake):  # noqa: F811
    page = tmp_path / "page.md"
    page.write_text(
        "Intro.\n\n<!-- printed by: kvorch report -->\n```\nstale table\n```\n\nMiddle.\n\n"
        "<!-- printed by: kvorch runs --format csv -->\n```\nold\nlines\n```\nEnd.\n"
    )
    assert regenerate(lake.uri, (page,), check=True) == [f"{page}: kvorch report", f"{page}: kvorch runs --format csv"]
    assert "stale table" in page.read_text()  # --check writes nothing
    regenerate(lake.uri, (page,))
    text = page.read_text()
    report, runs = printed("kvorch report", lake.uri), printed("kvorch runs --format csv", lake.uri)
    assert text == (
        f"Intro.\n\n<!-- printed by: kvorch report -->\n```\n{report}```\n\nMiddle.\n\n"
        f"<!-- printed by: kvorch runs --format csv -->\n```\n{runs}```\nEnd.\n"
    )
    assert "knorm@-2" in report and regenerate(lake.uri, (page,), check=True) == []


def test_the_docs_tables_are_what_the_default_run_prints(default_run):
    """Every marked block compared with what the commands print on the lake of the README's
    first command's job, as written (tests/conftest.py runs it once for the session)."""
    check = [sys.executable, "-m", "tests.readme_tables", "--lake", str(default_run.lake), "--check"]
    compared = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert compared.returncode == 0, compared.stdout + compared.stderr
