"""The engine's settings and the facts about a document's shape that the driver also needs.

This module imports no torch at load time, so the driver (spec, CLI, planner) can take the
defaults and the cache-length rule from here without loading the engine. Every default the
CLI, the presets and the actor show is read from :class:`EngineSettings`'s fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.contract import defaults

# The two caches (``--cache``, workers/engine/cache.py): held keeps per config only what it keeps,
# masked keeps every position of the document for every config and masks what it evicted.
CACHES = ("held", "masked")
# Slots per page of the held cache's pools (workers/engine/pool.py), smallest and largest: the unit
# a (row, kv-head)'s segment grows by. workers/engine/capacity.py's page_size picks, per pool, the
# largest that wastes at most an eighth of what an owner needs on average (half a page each):
# attention pays per page (its owner's queries copied, its output combined), so large pools want
# large pages, and small ones small pages. Here because the driver's memory estimate reads it.
POOL_PAGE_SIZES = (32, 256)


@dataclass(frozen=True)
class EngineSettings:
    chunk_size: int = 128
    window: int = 128
    attn: str = "sdpa"
    # Run the chunk step under torch.compile (``--compile``; on by default on CUDA).
    compile: bool = False
    # The compiled step's static shapes (cache padded to a length bucket, every chunk padded to
    # the chunk size, bounds as tensors). None: exactly when compiling. The preflight sets it
    # without compiling, to try each press on the very code path a compiled sweep will trace.
    static: bool | None = None
    # With compile on CUDA: replay the compiled step as a CUDA graph (torch.compile's
    # "reduce-overhead", ``--cuda-graphs``). Off until measured on a GPU (BENCHMARKS.md).
    cuda_graphs: bool = False
    # Record each config's agreement with the uncompressed model (KL, top-1, top-5; the
    # kl_sum/top1_agree/top5_overlap_sum columns). A batch without baseline then runs it as a
    # hidden extra row: its logits are the reference.
    agreement: bool = True
    # The KV cache (``--cache``, workers/engine/capacity.py): "held" keeps per config only what it
    # keeps (attention and memory follow density), "masked" every position for every config.
    cache: str = "held"

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk size must be >= 1, got {self.chunk_size}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        check_backend(self.attn)
        if self.cache not in CACHES:
            raise ValueError(f"unknown cache {self.cache!r}; use one of {', '.join(CACHES)}")

    @property
    def static_shapes(self) -> bool:
        return self.compile if self.static is None else self.static


# How a question task's prompt meets the cache (``--protocol``): "chunked" streams the context in
# chunks, evicting between them; "once" (kvpress's) reads the whole context in one chunk and
# compresses it once. Then, either way, the question and the answer.
PROTOCOLS = ("chunked", "once")


@dataclass(frozen=True)
class GenerationSettings:
    """How every config answers a question task (workers/engine/generation.py)."""

    max_new_tokens: int = 32
    protocol: str = "chunked"
    # The question inside the compressed part (the press may use it to choose), or read after it
    # with the cache as compressed (kvpress's query_aware, False by default there too).
    query_aware: bool = False
    # Go on evicting while the answer is generated (a threshold decides each key leaving the
    # window; ratio and budget are re-applied every decode_interval tokens); False freezes the
    # cache after the prompt.
    decode_eviction: bool = True
    # Generated tokens between two re-applications of a ratio or budget limit (kvpress's
    # compression_interval, 1 by default as here): fewer sorts of the cache, more keys held between.
    decode_interval: int = 1
    # Texts that end an answer where they first appear (the answer is cut before them): a task's
    # own end, such as a newline after a short answer, beyond the model's end-of-sequence tokens.
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max new tokens must be a whole number, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max new tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.decode_interval, bool) or not isinstance(self.decode_interval, int):
            raise ValueError(f"decode interval must be a whole number, got {self.decode_interval!r}")
        if self.decode_interval < 1:
            raise ValueError(f"decode interval must be >= 1, got {self.decode_interval}")
        for text in self.stop:
            if not isinstance(text, str) or not text:
                raise ValueError(
                    f"stop string {text!r} would end every answer before its first token; give a non-empty text"
                )
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; use one of {', '.join(PROTOCOLS)}")


# --attn flex needs FlexAttention.
FLEX_MIN_TORCH = "2.5"


def check_backend(name: str) -> None:
    """A one-line ValueError for a backend that is unknown or that this torch cannot run."""
    if name not in defaults.BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of {', '.join(defaults.BACKENDS)}")
    if name == "flex" and not flex_available():
        import torch

        raise ValueError(
            f"--attn flex needs torch >= {FLEX_MIN_TORCH} (FlexAttention); this is torch {torch.__version__}: "
            "upgrade torch or use --attn sdpa"
        )


def flex_available() -> bool:
    """Whether this torch has FlexAttention (imported here, not at load: the driver's help stays torch-free)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """The chunks [s, e) a document of ``n`` tokens is fed in: the one place they are computed."""
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def padded_length(n: int, chunk: int) -> int:
    """The cache length a document of ``n`` tokens runs at with static shapes: whole chunks,
    rounded up to a power of two of chunks, so documents of similar length share one compiled
    graph (a few buckets per corpus, not one per length) at the cost of attending over at most
    twice the padding."""
    chunks = -(-n // chunk)
    return chunk * (1 << max(0, chunks - 1).bit_length())


def cache_positions(n: int, chunk: int, static: bool) -> int:
    """Positions the cache allocates per (config, layer, kv-head) for a document of ``n`` tokens:
    the length bucket with static shapes, the document itself otherwise. The step allocates
    exactly this and the batch-size estimate (workers/contract/memory.py) plans for exactly this."""
    return padded_length(n, chunk) if static else n
