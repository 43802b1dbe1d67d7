"""Text to token ids, one way for every run and every transformers version.

Whether ``tokenizer(text, add_special_tokens=True)`` prepends BOS is the tokenizer's (and the
transformers release's) business: for the embedded SmolLM2 GGUF, transformers 5.2 prepended
BOS and 5.23+ does not, so the same command scored different ids under two installs. kvorch
therefore encodes the text alone (``add_special_tokens=False``) and prepends the tokenizer's
``bos_token_id`` itself, as the run's ``--bos`` says:

- ``on``: prepend BOS; an error if the tokenizer declares none.
- ``off``: never.
- ``auto`` (default): prepend BOS exactly when the tokenizer declares a ``bos_token_id``. That
  id comes from the model's files (GGUF ``tokenizer.ggml.bos_token_id``, the HF special tokens),
  not from how a release interprets add-BOS flags, so the rule gives the same ids everywhere.
  It gives every document the same first token: position 0 is the attention sink that sink- and
  window-keeping presses rely on, so it should not be whatever word a document starts with.
  For SmolLM2 that prepends ``<|im_start|>`` (id 1), the token its instruct training put first
  in every sequence, and reproduces transformers 5.2's ids; ``--bos off`` gives 5.23+'s ids
  (the GGUF's own ``add_bos_token`` flag is false).

The resolved choice and a fingerprint of the ids are recorded in the run's spec.json.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

BOS_MODES = ("auto", "on", "off")
DEFAULT_BOS = "auto"


@dataclass(frozen=True)
class Tokenization:
    """A tokenizer plus the BOS id to prepend (None: nothing is prepended)."""

    tokenizer: Any
    bos_id: int | None

    def ids(self, text: str, max_tokens: int) -> list[int]:
        """The text's ids, BOS first when resolved on, cut to ``max_tokens``; only as much of the
        text is tokenized as those ids need (:func:`first_ids`)."""
        prefix = [self.bos_id] if self.bos_id is not None else []
        wanted = max_tokens - len(prefix)
        body = first_ids(self.tokenizer, text, wanted) if wanted > 0 else []
        return (prefix + body)[:max_tokens]

    def fingerprint(self, documents: Iterable[list[int]]) -> dict:
        """What spec.json records: enough to tell two runs' token ids apart at a glance."""
        return {
            "tokenizer": type(self.tokenizer).__name__,
            "vocab_size": len(self.tokenizer),
            "bos_resolved": self.bos_id is not None,
            "bos_token_id": self.bos_id,
            "token_ids_sha256": token_ids_sha256(documents),
        }


# Characters per token a first try at a prefix allows (tokens of natural text average 3 to 5).
CHARS_PER_TOKEN = 16


def first_ids(tokenizer: Any, text: str, n: int) -> list[int]:
    """The first ``n`` ids of ``text`` as the whole text tokenizes, from a prefix of it.

    Tokenizing a 50 MB line to keep 256 of its tokens took 7.7 GB and 90 s. A prefix's ids can
    differ from the whole text's only near its cut, where a word is split; so a prefix is taken
    when its first ``n`` ids are the same as those of a prefix twice as long (they then do not
    depend on where the text is cut), and the prefix grows fourfold until they are. A text no
    longer than a prefix is tokenized whole, as before.
    """
    chars = CHARS_PER_TOKEN * n + 64
    while 2 * chars < len(text):
        short = _encode(tokenizer, text[:chars])
        if len(short) > n and short[:n] == _encode(tokenizer, text[: 2 * chars])[:n]:
            return short[:n]
        chars *= 4
    return _encode(tokenizer, text)[:n]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def resolve(tokenizer: Any, bos: str) -> Tokenization:
    """The tokenization of ``--bos`` for ``tokenizer``; ValueError with the fix for an impossible one."""
    if bos not in BOS_MODES:
        raise ValueError(f"--bos {bos!r} is unknown; use one of {', '.join(BOS_MODES)}")
    declared = tokenizer.bos_token_id
    if bos == "on" and declared is None:
        name = type(tokenizer).__name__
        raise ValueError(
            f"--bos on, but this model's tokenizer ({name}) has no BOS token; pass --bos auto or --bos off"
        )
    return Tokenization(tokenizer, None if bos == "off" else declared)


def load(model: str, bos: str) -> Tokenization:
    """The model's tokenizer (workers.contract.models.load_tokenizer) under ``--bos``."""
    from workers.contract.models import load_tokenizer

    return resolve(load_tokenizer(model), bos)


def token_ids_sha256(documents: Iterable[list[int]]) -> str:
    """sha256 of the documents' ids as compact JSON, ``[[ids of doc 1], [ids of doc 2], ...]``."""
    return hashlib.sha256(json.dumps([list(d) for d in documents], separators=(",", ":")).encode()).hexdigest()


def difference(a: dict, b: dict) -> str | None:
    """How two recorded fingerprints (spec.json ``tokenization``) differ, or None when they agree."""
    parts = []
    if (a.get("bos_resolved"), a.get("bos_token_id")) != (b.get("bos_resolved"), b.get("bos_token_id")):
        parts.append(f"bos {_bos_text(a)} vs {_bos_text(b)}")
    if a.get("token_ids_sha256") != b.get("token_ids_sha256"):
        parts.append(f"token ids sha256 {str(a.get('token_ids_sha256'))[:12]} vs {str(b.get('token_ids_sha256'))[:12]}")
    return "; ".join(parts) or None


def _bos_text(fingerprint: dict) -> str:
    return f"on (id {fingerprint.get('bos_token_id')})" if fingerprint.get("bos_resolved") else "off"
