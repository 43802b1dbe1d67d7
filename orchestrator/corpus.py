"""Corpus loading: the embedded long documents, JSONL, Parquet, or a directory of .txt files.

The embedded corpus is built from ``pydoc_data.topics``, the help text that ships with every
CPython: real English prose and code, no download. Topics are concatenated in name order into
documents of at least :data:`EMBEDDED_DOC_CHARS` characters, so ids are deterministic.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.errors import KvorchError
from workers.contract import tokenization
from workers.contract.models import resolve_model

EMBEDDED_CORPUS = "pydoc"
EMBEDDED_DOC_CHARS = 12_000


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    source: str


def load_corpus(corpus: str) -> list[Document]:
    """Every document of the corpus, in a deterministic order; KvorchError when unusable."""
    if corpus == EMBEDDED_CORPUS:
        docs = _embedded()
    else:
        check_corpus(corpus)
        path = Path(corpus)
        if path.is_dir():
            docs = _text_dir(path)
        elif path.suffix == ".jsonl":
            docs = _jsonl(path)
        else:
            docs = _parquet(path)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise KvorchError(f"corpus {corpus} has no non-empty documents; add documents with a 'text' field")
    seen: set[str] = set()
    for doc in docs:
        if doc.doc_id in seen:
            raise KvorchError(f"corpus {corpus}: document id {doc.doc_id!r} appears twice; make ids unique")
        seen.add(doc.doc_id)
    return docs


_NOT_REGULAR = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def check_corpus(corpus: str, what: str | None = None) -> None:
    """A one-line KvorchError for a corpus path that cannot be read as one: missing, a FIFO or
    device, or of another file type. Cheap and torch-free, so ``kvorch submit`` says it at once.
    ``what`` names the path as the user gave it (default ``corpus PATH``)."""
    if corpus == EMBEDDED_CORPUS:
        return
    what = what or f"corpus {corpus}"
    path = Path(corpus)
    if not path.exists():
        raise KvorchError(
            f"{what} not found: pass '{EMBEDDED_CORPUS}', a .jsonl or .parquet file, or a directory of .txt files"
        )
    if path.is_dir():
        return
    check_regular_file(path, what)
    if path.suffix not in (".jsonl", ".parquet"):
        raise KvorchError(
            f"{what}: unsupported file type {path.suffix!r}; use .jsonl, .parquet or a directory of .txt files"
        )


def check_regular_file(path: Path, what: str) -> None:
    """A one-line KvorchError when ``path`` (after symlinks) is a FIFO, socket or device: reading
    one blocks until a writer comes, or never ends (``/dev/zero``), so it is refused before any
    open. ``what`` names the path as the user gave it ("corpus my.jsonl")."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # missing or unreadable: the open that follows names it
    for test, kind in _NOT_REGULAR:
        if test(mode):
            raise KvorchError(
                f"{what} is {kind}, not a regular file: reading it would block or never end; "
                "pass a .jsonl or .parquet file, or a directory of .txt files"
            )


def _embedded() -> list[Document]:
    from pydoc_data.topics import topics

    docs, parts, first = [], [], None
    for name in sorted(topics):
        first = first or name
        parts.append(topics[name])
        if sum(len(p) for p in parts) >= EMBEDDED_DOC_CHARS:
            docs.append(Document(f"pydoc-{len(docs):03d}-{first}", "\n\n".join(parts), "pydoc_data.topics"))
            parts, first = [], None
    return docs


def _jsonl(path: Path) -> list[Document]:
    docs = []
    for number, record in jsonl_records(path, "the corpus"):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise KvorchError(f"{path}:{number}: no string field 'text'; each line needs {{\"text\": ...}}")
        doc_id = str(record.get("id", f"{path.stem}-{number:06d}"))
        docs.append(Document(doc_id, record["text"], str(path)))
    return docs


def jsonl_records(path: Path, what: str) -> Iterator[tuple[int, Any]]:
    """Each non-blank line of a JSONL file as (line number, parsed value). Every JSONL input (a
    corpus, a probe file) reports bad bytes and bad JSON the same way: one line naming file:line
    and the fix; ``what`` names the file in the UTF-8 fix ("the corpus")."""
    check_regular_file(path, str(path))
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            line = _decode(raw, f"{path}:{number}", what)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KvorchError(
                    f"{path}:{number}: not valid JSON ({exc.msg}); each line must be one JSON object"
                ) from None
            yield number, record


def _parquet(path: Path) -> list[Document]:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise KvorchError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    if "text" not in table.column_names:
        raise KvorchError(
            f"{path}: no column 'text'; the Parquet corpus needs a string column 'text' (and optionally 'id')"
        )
    text_type = table.schema.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise KvorchError(
            f"{path}: column 'text' holds {text_type}, not strings; store the documents' text as a string column"
        )
    texts = table.column("text").to_pylist()
    ids = (
        table.column("id").to_pylist()
        if "id" in table.column_names
        else [f"{path.stem}-{i:06d}" for i in range(len(texts))]
    )
    return [Document(str(i), t or "", str(path)) for i, t in zip(ids, texts, strict=False)]


def _text_dir(path: Path) -> list[Document]:
    files = sorted(path.glob("*.txt"))
    if not files:
        raise KvorchError(f"{path} has no .txt files; put one document per .txt file there")
    for file in files:  # every one before reading any
        check_regular_file(file, f"corpus file {file}")
    return [Document(f.stem, _decode(f.read_bytes(), str(f)), str(f)) for f in files]


def _decode(data: bytes, where: str, what: str = "the corpus") -> str:
    """UTF-8 text, or a KvorchError naming the file (and line) and the first bad byte: replacing
    bad bytes silently would evaluate, and hash, a text the user never wrote."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KvorchError(
            f"{where}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); save {what} as UTF-8"
        ) from None


def model_inputs(model: str, corpus: str, bos: str) -> tuple[tokenization.Tokenization, list[Document]]:
    """The preamble of every command that evaluates documents (submit, heads analyze, kvzap
    train): the model id checked, its tokenizer loaded with ``--bos`` resolved, and the whole
    corpus (callers take their slice: the sweep's documents, held-out ones, skipped ones).
    Each problem is a one-line KvorchError before anything starts."""
    try:
        resolve_model(model)
    except ValueError as exc:
        raise KvorchError(f"--model: {exc}") from None
    try:
        tokens = tokenization.load(model, bos)
    except ValueError as exc:
        raise KvorchError(str(exc)) from None
    return tokens, load_corpus(corpus)
