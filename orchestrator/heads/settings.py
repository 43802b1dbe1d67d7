"""The settings of ``kvorch heads analyze`` (its options' defaults), free of torch, so the
command's ``--help`` never loads it: the classifier's thresholds, the analysis spec, and the
head-statistics probe's defaults (mirrored from ``workers.studies.head_stats.HeadStatsProbe``, which is
a press and imports torch; tests/test_fast_help.py holds them equal)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchestrator.errors import KvorchError
from workers.contract import tokenization
from workers.contract.settings import EngineSettings

if TYPE_CHECKING:
    from workers.studies.head_stats import HeadStatsProbe

# Below this many documents the bootstrap over chunks is optimistic (chunks of one document agree).
FEW_DOCS = 4
# HeadStatsProbe's defaults: sink positions, the recent window, the first query position measured.
PROBE_DEFAULTS = {"n_sink": 4, "recent": 64, "min_position": 256}


def _probe() -> HeadStatsProbe:
    from workers.studies.head_stats import HeadStatsProbe

    return HeadStatsProbe()


@dataclass(frozen=True)
class ClassifierSettings:
    positional_below: float = 0.05
    gathering_above: float = 0.3
    tail: float = 0.05  # attention share a recommended window may leave out
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.positional_below <= self.gathering_above <= 1:
            raise ValueError("need 0 <= positional_below <= gathering_above <= 1")
        if not 0 < self.tail < 1 or self.bootstrap < 1:
            raise ValueError("need 0 < tail < 1 and bootstrap >= 1")


@dataclass(frozen=True)
class AnalysisSpec:
    model: str
    corpus: str
    probe: HeadStatsProbe = field(default_factory=lambda: _probe())
    classifier: ClassifierSettings = ClassifierSettings()
    skip_docs: int = 0  # corpus documents before the analysed ones (the preset analyses held-out ones)
    max_docs: int = 8
    max_tokens: int = 1024
    chunk_size: int = EngineSettings.chunk_size  # the unit the bootstrap resamples
    dtype: str = "auto"
    device: str = "auto"
    actors: int | None = None
    bos: str = tokenization.DEFAULT_BOS

    def __post_init__(self) -> None:
        if self.max_tokens <= self.probe.min_position:
            raise KvorchError(
                f"--max-tokens {self.max_tokens} leaves no query past --min-position {self.probe.min_position}; "
                "raise --max-tokens or lower --min-position"
            )
        if self.max_docs < 1:
            raise KvorchError(f"--max-docs must be >= 1, got {self.max_docs}")
        self.engine_settings()

    def engine_settings(self) -> EngineSettings:
        """The probe evicts nothing (every key scores +inf), so the window changes no number; it
        is the chunk size only so that no key is ever outside it."""
        from orchestrator.sweep.spec import engine_settings

        return engine_settings(chunk_size=self.chunk_size, window=self.chunk_size)

    def identity(self) -> dict:
        """What determines the table (not where or on how many actors it is computed)."""
        return {
            "model": self.model,
            "corpus": self.corpus,
            "skip_docs": self.skip_docs,
            "max_docs": self.max_docs,
            "max_tokens": self.max_tokens,
            "chunk_size": self.chunk_size,
            "probe": self.probe.all_params(),
            "classifier": dataclasses.asdict(self.classifier),
            "dtype": self.dtype,
            "bos": self.bos,
        }

    @property
    def analysis_id(self) -> str:
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()
        return f"heads-{digest[:12]}"


@dataclass(frozen=True)
class QFilterSpec:
    """What ``kvorch heads qfilters`` measures Q-Filters from (orchestrator/heads/qfilters.py):
    the model's post-RoPE queries over corpus documents, written to ``out`` for ``qfilter:path=``."""

    model: str
    corpus: str
    out: str
    skip_docs: int = 0  # corpus documents before the measured ones (keep evaluation documents out)
    max_docs: int = 8
    max_tokens: int = 1024
    chunk_size: int = EngineSettings.chunk_size
    dtype: str = "auto"
    device: str = "auto"
    actors: int | None = None
    bos: str = tokenization.DEFAULT_BOS

    def __post_init__(self) -> None:
        if not self.out.strip():
            raise KvorchError("--out is empty; give the directory the filters go to")
        if self.max_docs < 1 or self.skip_docs < 0 or self.max_tokens < 2:
            raise KvorchError("need --max-docs >= 1, --skip-docs >= 0 and --max-tokens >= 2")
        self.engine_settings()

    def engine_settings(self) -> EngineSettings:
        """The probe evicts nothing (every key scores +inf): the window changes no query."""
        from orchestrator.sweep.spec import engine_settings

        return engine_settings(chunk_size=self.chunk_size, window=self.chunk_size)
