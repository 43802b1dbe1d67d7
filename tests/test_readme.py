"""The README's commands, as a newcomer copies them: every ``bash`` and ``python`` block of
README.md, CONTRIBUTING.md and docs/ is extracted; every kvorch command in it parses (its options
and their values, and its ``--help``); the README's cheap ones run, in order, then the Python
blocks of the docs pages, in a folder whose ``./kvorch-lake`` holds a run of the README's first
command (``kvorch submit --methods all``, as written: the session's run, which
tests/test_readme_tables.py checks the docs' tables against). Commands that start long jobs are
only parsed. docs/cli.md names every option of every command.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
# Pages whose code blocks are excerpts of kvorch's code, not programs to run as they stand.
EXCERPTS = {"DESIGN.md"}
# kvorch commands that start a job of minutes (a Ray job on the model): parsed and --help only.
LONG = {("submit",), ("heads", "analyze"), ("kvzap", "train"), ("scores",)}
# Shell commands other than kvorch's, by their first words: what the test does with them.
RUN_SHELL = ("python3 -c",)  # cheap: run as written
NOT_RUN = {
    "python3 -m venv": "the first command: the fixture's lake stands in for its run",
    ". .venv/bin/activate": "the first command: the tests run in that environment",
    "bash .ci/run": "the whole test suite",
    ".venv/bin/pytest": "the test suite",
    "pip install": "installs into the environment the tests run in",
    ".venv/bin/pip install": "installs into the environment the tests run in",
    "ray up": "starts a cloud cluster",
    "ray dashboard": "needs a cloud cluster",
    "ray down": "needs a cloud cluster",
    "export RAY_ADDRESS": "points at a cloud cluster",
    "aws s3": "needs a bucket",
}
FENCE = re.compile(r"^( *)```(\w*)\s*$")


def blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, first line number, text) of every fenced block of ``path``."""
    found, lines, open_at = [], path.read_text(encoding="utf-8").splitlines(), None
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if not fence:
            continue
        if open_at is None:
            open_at, language, indent = number, fence.group(2), len(fence.group(1))
        else:
            body = "\n".join(text[indent:] for text in lines[open_at : number - 1])
            found.append((language, open_at + 1, body))
            open_at = None
    return found


def shell_commands(text: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped, ``&&`` split;
    redirections and pipes stay shell syntax."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for word in [*lexer, "&&"]:
            if word == "&&":
                if command:
                    commands.append(" ".join(command))
                command = []
            else:
                command.append(word if set(word) <= set("();<>|&") else shlex.quote(word))
    return commands


def documented() -> list[tuple[str, str, str]]:
    """(where, language, command or code) of every block of the docs, in order."""
    out = []
    for path in DOCS:
        for language, line, text in blocks(path):
            where = f"{path.name}:{line}"
            if language == "bash":
                out.extend((where, "bash", command) for command in shell_commands(text))
            elif language == "python":
                out.append((where, "python", text))
    return out


def kvorch_path(args: list[str]) -> tuple[tuple[str, ...], click.Context]:
    """The subcommand path of ``kvorch ARGS`` and its parsed context: every option, choice and
    type is checked as Click checks it before running, so a stale option fails here."""
    command: click.Command = main
    ctx = main.make_context("kvorch", list(args), resilient_parsing=False)
    path: list[str] = []
    while isinstance(command, click.Group):
        protected = getattr(ctx, "_protected_args", None)  # Click >= 8.2 keeps the subcommand here
        args = [*protected, *ctx.args] if protected is not None else [*ctx.protected_args, *ctx.args]
        name, sub, rest = command.resolve_command(ctx, args)
        assert sub is not None, f"no command {name!r}"
        path.append(name)
        command, ctx = sub, sub.make_context(name, rest, parent=ctx)
    return tuple(path), ctx


def classify(command: str) -> str:
    """'run', 'parse' (a long kvorch job) or the reason it is not run."""
    words = shlex.split(command)
    if words[0] == "kvorch":
        path, _ = kvorch_path(words[1:])
        if path in LONG or any(w.startswith(("s3://", "gs://")) for w in words):
            return "parse"
        return "run"
    if command.startswith(RUN_SHELL):
        return "run"
    reason = next((why for start, why in NOT_RUN.items() if command.startswith(start)), None)
    assert reason, f"README command {command!r} is neither run nor named in NOT_RUN: classify it"
    return reason


def test_every_documented_kvorch_command_parses_and_has_help():
    """Every kvorch command of README.md, CONTRIBUTING.md and docs/ parses as written (a renamed
    or removed option fails), and its command's --help works."""
    seen = set()
    for where, language, command in documented():
        if language != "bash" or not command.startswith("kvorch"):
            continue
        path, _ = kvorch_path(shlex.split(command)[1:])
        seen.add(path)
        assert classify(command), where
    for path in sorted(seen):
        result = CliRunner().invoke(main, [*path, "--help"], prog_name="kvorch")
        assert result.exit_code == 0, (path, result.output)
        assert "Usage: kvorch " + " ".join(path) in result.output


def test_a_stale_option_fails_the_parse():
    """The check above would catch a README command whose option no longer exists."""
    with pytest.raises(click.NoSuchOption):
        kvorch_path(["report", "--no-such-option"])
    with pytest.raises(click.BadParameter):
        kvorch_path(["report", "--format", "yaml"])


def test_every_shell_command_of_the_readme_is_classified():
    """A new kind of command in the README needs a decision here: run it, or say why not."""
    commands = [c for _, language, c in documented() if language == "bash"]
    assert any(c.startswith("kvorch report") for c in commands)
    for command in commands:
        assert classify(command)


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory, default_run) -> Path:
    """A folder holding ``./kvorch-lake``, a copy of the README's first command's run (the
    session's, tests/conftest.py), so the commands below cannot change what other tests read."""
    # The first table a newcomer sees fits a 120-column terminal; --wide is named for the rest.
    assert max(map(len, default_run.stdout.splitlines())) <= 120, default_run.stdout
    assert "--wide shows every column" in default_run.stdout, default_run.stdout
    folder = tmp_path_factory.mktemp("newcomer")
    shutil.copytree(default_run.lake, folder / "kvorch-lake")
    return folder


def runs_here(where: str, language: str) -> bool:
    """Whether the top-to-bottom run runs this block: the README's, then the docs pages' Python
    (moved there from the README: the notebook API, the example press)."""
    page = where.split(":")[0]
    if page == "README.md":
        return True
    return language == "python" and page != "CONTRIBUTING.md" and page not in EXCERPTS


def test_the_readme_runs_top_to_bottom(readme_folder):
    """Every cheap command of the README, in order, after the first command, then every Python
    block of docs/: none fails. Long jobs are parsed only (above)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    ran = []
    for where, language, command in documented():
        if not runs_here(where, language):
            continue
        if language == "python":
            argv = [sys.executable, "-c", command]
        elif classify(command) == "run":
            argv = ["bash", "-c", command]
        else:
            continue
        done = subprocess.run(argv, cwd=readme_folder, env=env, capture_output=True, text=True, timeout=300)
        if language == "python" and done.returncode and "No module named 'pandas'" in done.stderr:
            # This environment lacks the notebook extra: the error must say what to install.
            assert "kvorch[notebook]" in done.stderr, done.stderr
            done = subprocess.run(
                [sys.executable, "-c", command.replace(".to_pandas()", "")],
                cwd=readme_folder, env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
        assert done.returncode == 0, f"{where}: {command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        ran.append((where, language, command))
    assert any(c.startswith("kvorch report --table all") for _, _, c in ran)
    assert any(w.startswith("lake-and-sql.md") and "kvorch.open_lake" in c for w, _, c in ran)
    assert any(w.startswith("writing-a-press.md") and "@register" in c for w, _, c in ran)
    assert (readme_folder / "plots" / "index.html").is_file()
    assert (readme_folder / "my_docs.jsonl").stat().st_size > 0


def cli_commands(command: click.Command = main, path: tuple[str, ...] = ()):
    """(path, command) of every kvorch command below ``command``."""
    if isinstance(command, click.Group):
        ctx = click.Context(command, info_name="kvorch")
        for name in command.list_commands(ctx):
            yield from cli_commands(command.get_command(ctx, name), (*path, name))
    else:
        yield path, command


def test_docs_cli_names_every_command_and_option():
    """docs/cli.md is the option reference: a new command or option needs its line there."""
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    missing = []
    for path, command in cli_commands():
        if f"kvorch {' '.join(path)}" not in text:
            missing.append(" ".join(path))
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("--") and opt != "--help" and not re.search(rf"[`/]{re.escape(opt)}\b(?!-)", text):
                    missing.append(f"{' '.join(path)} {opt}")
    assert not missing, f"docs/cli.md does not name: {', '.join(missing)}"


# "471 tests in about 280 s on 2 cores", and the slow ones: what README.md and CONTRIBUTING.md say of the fast loop.
FAST_LOOP = re.compile(r"(\d+) tests in about (\d+) s on 2\s+cores")
SLOW_COUNT = re.compile(r"(?:every test but the|the other)\s+(\d+)")


def fast_loop_claims(path: Path) -> tuple[int, int, int]:
    """(tests, seconds, slow tests) that ``path`` states for the fast loop, each stated once."""
    text = path.read_text(encoding="utf-8")
    loops, slow = FAST_LOOP.findall(text), SLOW_COUNT.findall(text)
    assert len(loops) == 1 and len(slow) == 1, (path.name, loops, slow)
    return int(loops[0][0]), int(loops[0][1]), int(slow[0])


def test_readme_and_contributing_state_the_same_fast_loop():
    assert fast_loop_claims(ROOT / "README.md") == fast_loop_claims(ROOT / "CONTRIBUTING.md")


@pytest.mark.slow
def test_the_stated_test_counts_are_the_suites():
    """Within 10 %: the docs may lag a few tests behind, never a release."""
    tests, _, slow = fast_loop_claims(ROOT / "README.md")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    counted = re.search(r"(\d+)/\d+ tests collected \((\d+) deselected\)", done.stdout)
    assert counted, done.stdout[-2000:]
    fast, deselected = map(int, counted.groups())
    assert abs(tests - fast) <= 0.1 * fast and abs(slow - deselected) <= max(2, 0.1 * deselected), (fast, deselected)


def torch_note() -> str:
    """The README's paragraph on what `pip install torch==2.13.0` installs."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return next(p for p in text.split("\n\n") if p.startswith("`torch==2.13.0` comes first"))


def test_the_torch_note_says_what_the_pin_does_here_and_elsewhere_without_naming_a_host():
    note = " ".join(torch_note().split())
    assert "2.13.0+cpu" in note and "this project's own index" in note  # here
    assert "CUDA one" in note and "CPU wheel of torch" in note and "`--index-url`" in note  # elsewhere
    assert not re.search(r"https?:|www\.|\b[\w-]+\.(?:org|com|io|net|dev)\b", note), note
