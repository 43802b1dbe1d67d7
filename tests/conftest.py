"""Shared fixtures: tiny models built from configs, the embedded SmolLM2, a local Ray."""

from __future__ import annotations

import subprocess
import sys
from copy import deepcopy
from pathlib import Path
from typing import NamedTuple

import pytest
import ray
import torch
from transformers import LlamaForCausalLM

from tests.helpers import tiny_llama
from workers.contract.models import EMBEDDED_MODEL, load_model, load_tokenizer

# Fixtures that make a test slow: a real Ray job, or the embedded 135M-parameter model.
SLOW_FIXTURES = frozenset({"local_ray", "smollm2", "smollm2_dir", "default_run"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that starts Ray jobs or runs the embedded model, so
    ``pytest -m "not slow"`` is the fast loop of tiny models built in memory."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded model (real trained weights), loaded once for the session."""
    return load_model(EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    return load_tokenizer(EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory, smollm2, smollm2_tokenizer) -> str:
    """The embedded model's weights and tokenizer as a local HF directory (safetensors), saved once.

    Ray jobs of tests that are about SmolLM2's numbers, not its GGUF file, pass it as ``--model``:
    an actor loads it in a second where dequantizing the GGUF takes about 15 s, and the heads
    preset loads the model twice. The GGUF path under Ray is the README's first command's
    (``default_run``)."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("smollm2")
    # A deep copy of the config: an engine on the session's model set kvorch's attention in it,
    # and the GGUF's quantization_config (its file name) does not describe these weights.
    config = deepcopy(smollm2.config)
    del config.quantization_config
    copy = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    copy.load_state_dict(smollm2.state_dict())
    copy.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> str:
    """A local HF model directory (safetensors + tokenizer): a tiny Llama with SmolLM2's vocabulary.

    CLI tests use it to exercise the local-dir loading path at a fraction of SmolLM2's cost.
    """
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab_size=len(smollm2_tokenizer)).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def local_ray():
    """One embedded Ray for every test that submits jobs; kvorch joins it instead of starting its own."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="kvorch-tests")
    yield
    ray.shutdown()


class DefaultRun(NamedTuple):
    lake: Path  # ./kvorch-lake of the folder the command ran in
    stdout: str  # what the command printed (its table)


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> DefaultRun:
    """The README's first command's job, as written (``kvorch submit --methods all``, in a fresh
    process that starts its own Ray), run once for the session because it is the suite's longest
    job (about 2 minutes on 2 cores): tests/test_readme_tables.py checks the docs' tables against
    its lake digit for digit, tests/test_readme.py runs the README's other commands on a copy."""
    folder = tmp_path_factory.mktemp("default-run")
    kvorch = str(Path(sys.executable).parent / "kvorch")
    submit = [kvorch, "submit", "--methods", "all", "--lake", str(folder / "kvorch-lake"), "--no-progress"]
    done = subprocess.run(submit, cwd=folder, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    return DefaultRun(folder / "kvorch-lake", done.stdout)
