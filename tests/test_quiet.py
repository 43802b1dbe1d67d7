"""Quiet by default (issue 29 "The first hour", point 10): Ray's start-up lines are replaced by
kvorch's one dashboard line, and the test suite filters torch's known warnings, each with its
reason in pyproject.toml, while any other warning still shows."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from orchestrator.pool.actors import RAY_STARTUP_LINES, quiet_ray_startup

ROOT = Path(__file__).resolve().parents[1]


def test_only_rays_startup_lines_are_dropped():
    quiet_ray_startup()
    quiet_ray_startup()  # once per process: no second filter
    for name, prefix in RAY_STARTUP_LINES.items():
        logger = logging.getLogger(name)
        assert len(logger.filters) == 1

        def record(message: str, name: str = name) -> logging.LogRecord:
            return logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)

        assert not logger.filter(record(f"{prefix}. Set RAY_AUTH_MODE=disabled to opt out."))
        assert logger.filter(record("Token authentication is enabled but no token was found."))


@pytest.mark.slow
def test_an_embedded_ray_starts_with_one_kvorch_line_and_no_ray_warning():
    """start_ray in a fresh process, as `kvorch submit` runs it."""
    code = "import ray\nfrom orchestrator.pool.actors import start_ray\nstart_ray(None, 'quiet')\nray.shutdown()\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for prefix in RAY_STARTUP_LINES.values():
        assert prefix not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("kvorch:")] == lines[-1:], done.stderr
    if "token authentication on" in lines[-1]:
        assert "`ray get-auth-token`" in lines[-1] and "RAY_AUTH_MODE=disabled" in lines[-1]


def test_torchs_known_warnings_are_filtered_and_any_other_shows():
    """Under the filters pytest installed from pyproject.toml."""
    known = [
        ("flex_attention called without torch.compile() - this will use an unfused ...", UserWarning),
        ("`torch.jit.script_method` is deprecated. Please switch to `torch.compile` ...", DeprecationWarning),
    ]
    with warnings.catch_warnings(record=True) as caught:
        for message, category in [*known, ("any other warning", UserWarning)]:
            warnings.warn(message, category, stacklevel=1)
    assert [str(w.message) for w in caught] == ["any other warning"]


def test_every_filtered_warning_has_its_reason():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    filters = tomllib.loads(text)["tool"]["pytest"]["ini_options"]["filterwarnings"]
    lines = text.splitlines()
    for entry in filters:
        at = next(i for i, line in enumerate(lines) if line.strip() == f'"{entry}",')
        assert lines[at - 1].strip().startswith("#"), f"{entry}: no comment above it says why"
