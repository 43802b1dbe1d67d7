"""The docs' printed tables, regenerated from what the commands print.

A table in README.md or docs/*.md that a command prints is marked, on the line before its code
block, with the command that prints it::

    <!-- printed by: kvorch report --wide -->

``python -m tests.readme_tables --lake DIR`` runs each marked command on the lake ``DIR``
(``--lake DIR`` appended; the README's tables come from ``kvorch submit --methods all``, so DIR
holds that run, newest) and rewrites the block below the marker with the command's stdout;
``--check`` writes nothing and exits 1 naming each block that differs. tests/test_readme_tables.py
checks a fresh default run against the docs (slow), and the rewriting on a small lake (fast).
Numbers in prose (a ratio quoted in a sentence) are not marked: they are written by hand.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
MARKER = re.compile(r"^<!-- printed by: (kvorch [^>]*?) -->\n```[^\n]*\n(.*?)^```", re.M | re.S)


@dataclass(frozen=True)
class Block:
    page: Path
    command: str  # as the marker says, without --lake
    text: str  # the block's lines as the page has them
    start: int  # where the block's text starts in the page
    end: int


def marked_blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    return [Block(page, m.group(1), m.group(2), m.start(2), m.end(2)) for m in MARKER.finditer(text)]


def printed(command: str, lake: str) -> str:
    """What ``command`` prints on stdout with ``--lake lake``; a failing command stops with its error."""
    args = [*shlex.split(command)[1:], "--lake", lake]
    result = CliRunner().invoke(main, args)
    if result.exit_code != 0:
        raise SystemExit(f"{command} --lake {lake} failed: {result.output.strip()}")
    return result.stdout if result.stdout.endswith("\n") else result.stdout + "\n"


def regenerate(lake: str, pages: tuple[Path, ...] = PAGES, check: bool = False) -> list[str]:
    """Rewrite (or, with ``check``, compare) every marked block of ``pages``; returns the blocks
    that differed, as ``page: command``."""
    differed = []
    for page in pages:
        blocks = marked_blocks(page)
        if not blocks:
            continue
        text = page.read_text(encoding="utf-8")
        for block in reversed(blocks):  # from the end, so earlier offsets stay valid
            now = printed(block.command, lake)
            if now != block.text:
                differed.append(f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page}: {block.command}")
                text = text[: block.start] + now + text[block.end :]
        if not check:
            page.write_text(text, encoding="utf-8")
    return differed[::-1]


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lake", required=True, help="the lake whose newest run is kvorch submit --methods all")
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when a block differs")
    args = parser.parse_args()
    differed = regenerate(args.lake, check=args.check)
    for where in differed:
        print(f"{'differs' if args.check else 'rewrote'}: {where}")
    if args.check and differed:
        sys.exit(1)


if __name__ == "__main__":
    main_()
