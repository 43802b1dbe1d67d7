"""The job spec: every choice of a submission, its config grid, and its JSON form.

Defaults live here and only here; the CLI shows them in its help.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchestrator.corpus import EMBEDDED_CORPUS, check_corpus
from orchestrator.errors import KvorchError
from orchestrator.probes import DEFAULT_DEPTHS, DEFAULT_LENGTHS, ProbeSpec, check_task, is_question_task
from orchestrator.probes.spec import check_spec
from orchestrator.sweep.method_names import check_method_names
from workers.contract.allocation import UNIFORM, Allocation, parse_allocation
from workers.contract.configs import POLICIES, RANKED_POLICIES, EvalConfig
from workers.contract.defaults import COMPILE_CACHE
from workers.contract.models import DTYPE_NAMES, EMBEDDED_MODEL
from workers.contract.settings import EngineSettings, GenerationSettings, check_backend
from workers.contract.tokenization import BOS_MODES, DEFAULT_BOS

if TYPE_CHECKING:
    from workers.presses import Press

DEFAULT_MAX_DOCS = 4
DEFAULT_MAX_TOKENS = 1024
DEFAULT_CHUNK_SIZE = EngineSettings.chunk_size
DEFAULT_WINDOW = EngineSettings.window
# auto: compile on CUDA, where it pays (orchestrator/sweep/compile_check.py confirms it can); see README.
COMPILE_MODES = ("auto", "on", "off")
# JobSpec's options of question tasks (GenerationSettings).
GENERATION_FIELDS = ("max_new_tokens", "protocol", "query_aware", "decode_eviction", "decode_interval", "stop")


@dataclass(frozen=True)
class JobSpec:
    model: str = EMBEDDED_MODEL
    corpus: str = EMBEDDED_CORPUS
    methods: tuple[str, ...] = ("all",)
    thresholds: tuple[str, ...] = ()
    policy: str = "threshold"
    ratios: tuple[float, ...] = ()
    budgets: tuple[int, ...] = ()
    # How each ranked config's ratio or budget is shared between (layer, kv-head)s: a sweep
    # dimension of its own (workers/contract/allocation.py); uniform is every head alike.
    allocations: tuple[str, ...] = (UNIFORM.label,)
    # Record each config's KL, top-1 agreement and top-5 overlap with the uncompressed model
    # (workers/engine/agreement.py); the run then always holds baseline, added when not requested.
    agreement: bool = EngineSettings.agreement
    max_docs: int | None = DEFAULT_MAX_DOCS
    max_tokens: int = DEFAULT_MAX_TOKENS
    chunk_size: int = DEFAULT_CHUNK_SIZE
    window: int = DEFAULT_WINDOW
    attn: str = EngineSettings.attn
    dtype: str = "auto"
    device: str = "auto"
    actors: int | None = None
    # Configs per batched forward; "auto" fits them to the worker's free memory (orchestrator/sweep/batching.py).
    batch_configs: int | str = "auto"
    compile: str = "auto"
    # With the compiled step on CUDA, replay it as a CUDA graph (EngineSettings.cuda_graphs).
    cuda_graphs: bool = EngineSettings.cuda_graphs
    # The KV cache: held (per config what it keeps) or masked (every position); EngineSettings.cache.
    cache: str = EngineSettings.cache
    # Where compiled chunk steps are cached on each machine (workers/engine/compile_cache.py).
    compile_cache: str = COMPILE_CACHE
    # BOS first in every document: auto|on|off, resolved against the tokenizer (workers/contract/tokenization.py).
    bos: str = DEFAULT_BOS
    # Target compressible densities: thresholds are calibrated to them (orchestrator/sweep/calibration.py).
    densities: tuple[float, ...] = ()
    # Retrieval probes instead of corpus documents (orchestrator/probes/): a built-in task or a
    # .jsonl of context/question/answer; the corpus is then needle's haystack, and --max-docs
    # and --max-tokens do not apply.
    task: str | None = None
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    samples: int = 1
    seed: int = 0
    # Question tasks (ruler, a .jsonl with answers): how every config answers
    # (workers/contract/settings.py, GenerationSettings). max_new_tokens None: each task's own.
    max_new_tokens: int | None = None
    protocol: str = GenerationSettings.protocol
    query_aware: bool = GenerationSettings.query_aware
    decode_eviction: bool = GenerationSettings.decode_eviction
    decode_interval: int = GenerationSettings.decode_interval
    stop: tuple[str, ...] = GenerationSettings.stop
    configs: tuple[EvalConfig, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise KvorchError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.max_docs is not None and self.max_docs < 1:
            raise KvorchError(f"--max-docs must be >= 1, got {self.max_docs}")
        # Missing, a FIFO or device (its first read would block), a wrong file type: refused now.
        check_corpus(self.corpus, f"--corpus {self.corpus}")
        object.__setattr__(self, "batch_configs", _parse_batch_configs(self.batch_configs))
        if self.compile not in COMPILE_MODES:
            raise KvorchError(f"--compile {self.compile!r} is unknown; use one of {', '.join(COMPILE_MODES)}")
        if not self.compile_cache.strip():
            raise KvorchError("--compile-cache is empty; give a directory (default ~/.cache/kvorch/compile)")
        if self.cuda_graphs and self.compile == "off":
            raise KvorchError("--cuda-graphs replays the compiled chunk step; it needs --compile auto or on, not off")
        if self.bos not in BOS_MODES:
            raise KvorchError(f"--bos {self.bos!r} is unknown; use one of {', '.join(BOS_MODES)}")
        try:
            check_backend(self.attn)
        except ValueError as exc:
            raise KvorchError(str(exc).replace("attention backend", "--attn", 1)) from None
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise KvorchError(f"--dtype {self.dtype!r} is unknown; use auto or one of {', '.join(DTYPE_NAMES)}")
        engine_settings(self.chunk_size, self.window, self.attn)
        self.generation_settings(GenerationSettings.max_new_tokens)  # the generation options' own checks
        if self.task is not None:
            check_task(self.task)
            check_spec(ProbeSpec(self.task, self.lengths, self.depths, self.samples, self.seed), None)
        if not self.configs:
            configs = build_configs(
                self.methods, self.thresholds, self.policy, self.ratios, self.budgets, self.window, self.allocations
            )
            if self.agreement and not any(c.is_baseline for c in configs):
                from workers.presses import BaselinePress

                configs.insert(0, EvalConfig(BaselinePress()))
            object.__setattr__(self, "configs", tuple(configs))
        if self.densities and self.thresholds:
            raise KvorchError("--densities and --thresholds both choose thresholds; pass only one of them")
        if self.densities and self.policy != "threshold":
            raise KvorchError("--densities calibrates thresholds; it works with --policy threshold, not ratio")
        if self.densities and all(c.threshold is None for c in self.configs):
            raise KvorchError("--densities needs a method with a threshold among --methods, e.g. knorm or h2o")
        self._check_replays()

    def _check_replays(self) -> None:
        """A press that scores the context from a replay of all of it (KVzip) needs it before the
        first eviction: question runs under --protocol once only, and no calibration on corpus text."""
        replaying = next((c.method for c in self.configs if c.press.replays_context), None)
        if replaying is None:
            return
        if self.task is None or not is_question_task(self.task):
            raise KvorchError(
                f"{replaying} replays the whole context before compressing it, which a corpus run's chunks do not "
                "allow: run it on a question task with --protocol once (e.g. --task ruler --protocol once)"
            )
        if self.protocol != "once":
            raise KvorchError(
                f"{replaying} replays the whole context before compressing it: add --protocol once "
                f"(--protocol {self.protocol} compresses the context chunk by chunk)"
            )
        if self.densities:
            raise KvorchError(
                f"--densities calibrates on corpus text, which {replaying} cannot score; pass --thresholds instead"
            )

    def engine_for(self, device: str) -> EngineSettings:
        """The engine settings on a pool of ``device`` ("cuda" or "cpu"), --compile auto resolved."""
        compile_ = self.compile == "on" or (self.compile == "auto" and device == "cuda")
        return engine_settings(
            self.chunk_size,
            self.window,
            self.attn,
            compile=compile_,
            cuda_graphs=self.cuda_graphs and compile_ and device == "cuda",
            agreement=self.agreement,
            cache=self.cache,
        )

    def generation_settings(self, task_budget: int) -> GenerationSettings:
        """How question tasks are answered; ``task_budget``: the tasks' own generation budget,
        taken when --max-new-tokens is not given."""
        try:
            return GenerationSettings(
                self.max_new_tokens if self.max_new_tokens is not None else task_budget,
                self.protocol,
                self.query_aware,
                self.decode_eviction,
                self.decode_interval,
                self.stop,
            )
        except ValueError as exc:
            words = {"protocol": "--protocol", "decode interval": "--decode-interval", "stop string": "--stop"}
            option = next((flag for word, flag in words.items() if word in str(exc)), "--max-new-tokens")
            raise KvorchError(f"{option}: {exc}") from None

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "configs"}
        # The generation options joined the spec with question tasks: left out at their defaults,
        # so every run made before keeps its fingerprint.
        for name in GENERATION_FIELDS:
            if out[name] == getattr(JobSpec, name):
                del out[name]
        out["methods"], out["thresholds"], out["ratios"] = list(self.methods), list(self.thresholds), list(self.ratios)
        out["budgets"] = list(self.budgets)
        # Allocations came after many runs: left out when uniform, so those keep their fingerprint.
        if self.allocations == (UNIFORM.label,):
            del out["allocations"]
        else:
            out["allocations"] = list(self.allocations)
        # --compact was removed (its rows were the masked cache's); the key stays so that
        # runs made before then still match their fingerprint and resume.
        out["compact"] = False
        # Runs made before the held cache were all masked: such a spec keeps its old fingerprint.
        if self.cache == "masked":
            del out["cache"]
        out["lengths"], out["depths"] = list(self.lengths), list(self.depths)
        if "stop" in out:
            out["stop"] = list(self.stop)
        out["configs"] = [
            {
                "config": c.label,
                "method": c.method,
                "params": c.press.params(),
                "policy": c.policy,
                "threshold": _json_float(c.threshold),
                "ratio": c.ratio,
                "budget": c.budget,
                **_allocation_json(c.allocation),
            }
            for c in self.configs
        ]
        return out


def _allocation_json(allocation: Allocation) -> dict:
    """A config's allocation in spec.json: nothing when uniform (older runs keep their
    fingerprint), a file's shares themselves (a file changed under the same name is another run)."""
    if allocation.uniform:
        return {}
    return {"allocation": allocation.label, **({"shares": allocation.shares} if allocation.kind == "file" else {})}


def build_configs(
    methods: tuple[str, ...],
    thresholds: tuple[str, ...],
    policy: str = "threshold",
    ratios: tuple[float, ...] = (),
    budgets: tuple[int, ...] = (),
    window: int = DEFAULT_WINDOW,
    allocations: tuple[str, ...] = (UNIFORM.label,),
) -> list[EvalConfig]:
    """The config grid: each method at its thresholds (user's, else the method's defaults), or
    under ``policy="ratio"`` / ``"budget"`` each scoring method at each compression ratio or
    token budget under each allocation (methods without a score, such as baseline and window,
    once as they are).

    A value or method config given twice is refused in one line, never run twice: its rows
    would count double in every table."""
    configs = _config_grid(methods, thresholds, policy, ratios, budgets, window, allocations)
    labels: dict[str, EvalConfig] = {}
    for config in configs:
        if config.label in labels:  # e.g. thresholds -16 and -16.0000001, both labelled knorm@-16
            raise KvorchError(
                f"two configs share the label {config.label} ({_setting(labels[config.label])} and "
                f"{_setting(config)}); give values that differ in their first 6 significant digits"
            )
        labels[config.label] = config
    return configs


def _setting(config: EvalConfig) -> str:
    value = next(v for v in (config.ratio, config.budget, config.threshold) if v is not None)
    return repr(value)


def _config_grid(
    methods: tuple[str, ...],
    thresholds: tuple[str, ...],
    policy: str,
    ratios: tuple[float, ...],
    budgets: tuple[int, ...],
    window: int,
    allocations: tuple[str, ...] = (UNIFORM.label,),
) -> list[EvalConfig]:
    presses = _parse_methods(methods)
    if policy not in POLICIES:
        raise KvorchError(f"--policy {policy!r} is unknown; use one of {', '.join(POLICIES)}")
    if ratios and policy != "ratio":
        raise KvorchError("--ratios needs --policy ratio")
    if budgets and policy != "budget":
        raise KvorchError("--budgets needs --policy budget")
    shares = _parse_allocations(allocations, policy)
    if policy in RANKED_POLICIES:
        if thresholds:
            raise KvorchError(f"--thresholds apply to --policy threshold; with --policy {policy} give --{policy}s only")
        if policy == "ratio":
            settings = [{"ratio": r} for r in _check_ratios(ratios)]
        else:
            settings = [{"budget": b} for b in _check_budgets(budgets, presses, window, shares)]
        configs = []
        for press in presses:
            if press.default_thresholds == (None,):  # no score to rank by: once, as it is
                configs.append(EvalConfig(press))
                continue
            _refuse_two_stages_across_heads(press, shares)
            configs.extend(EvalConfig(press, **setting, allocation=a) for setting in settings for a in shares)
        return configs
    overrides = _parse_thresholds(thresholds, presses)
    configs = []
    for press in presses:
        taus = overrides.get(press, press.default_thresholds)
        configs.extend(EvalConfig(press, tau) for tau in taus)
    return configs


def _check_ratios(ratios: tuple[float, ...]) -> tuple[float, ...]:
    if not ratios:
        raise KvorchError("--policy ratio needs --ratios, e.g. --ratios 0.3,0.5")
    bad = [r for r in ratios if not 0.0 <= r < 1.0]
    if bad:
        raise KvorchError(f"--ratios must lie in [0, 1), got {bad[0]:g}; e.g. 0.5 evicts half the keys")
    _check_once("--ratios", ratios)
    return ratios


def _parse_allocations(allocations: tuple[str, ...], policy: str) -> list[Allocation]:
    """``--allocation`` items, each once; any but uniform needs a ranked policy (it shares a
    keep limit the threshold policy has not got)."""
    _check_once_text("--allocation", allocations)
    try:
        parsed = [parse_allocation(text) for text in allocations]
    except ValueError as exc:
        raise KvorchError(f"--allocation: {exc}") from None
    shared = [a for a in parsed if not a.uniform]
    if shared and policy not in RANKED_POLICIES:
        raise KvorchError(f"--allocation {shared[0].label} shares a ratio or budget: use --policy ratio or budget")
    return parsed


def _refuse_two_stages_across_heads(press: Press, shares: list[Allocation]) -> None:
    """CriticalKV's first stage ranks within each head's own limit; AdaKV's budgets move between
    heads, so the combination has no single meaning (kvpress's CriticalAdaKV is a press of its own)."""
    ratio = getattr(press, "first_stage_ratio", 0)
    if ratio > 0 and any(a.kind == "adakv" for a in shares):
        raise KvorchError(
            f"{press.label()} selects in two stages (first_stage_ratio={ratio:g}), which --allocation adakv "
            f"cannot share between heads; give {press.name}:first_stage_ratio=0 or drop adakv"
        )


def _check_once_text(option: str, values: tuple[str, ...]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise KvorchError(f"{option} {','.join(values)} lists {value} twice; list each once")
        seen.add(value)


def _check_budgets(
    budgets: tuple[int, ...], presses: list[Press], window: int, allocations: list[Allocation] = (UNIFORM,)
) -> tuple[int, ...]:
    """Budgets count every key a (layer, kv-head) holds, sinks and protected window included, so
    a budget below a press's sinks + window could never be met: refused, naming the press. So is
    one that an allocation's table would put below it in some head (its smallest share)."""
    if not budgets:
        raise KvorchError("--policy budget needs --budgets, e.g. --budgets 128,256,1024 (keys per layer and head)")
    _check_once("--budgets", budgets)
    for press in (p for p in presses if p.default_thresholds != (None,)):
        protected = press.protected(window)
        floor = press.n_sink + protected
        low = [b for b in budgets if b < floor]
        if low:
            raise KvorchError(
                f"--budgets {low[0]} is below {press.label()}'s sinks + window "
                f"({press.n_sink} + {protected} = {floor}); use budgets >= {floor}, or a smaller --window"
                + (f" (or {press.name}:protected_window=N)" if press.protected_window > window else "")
            )
        for allocation in allocations:
            share = allocation.head_floor_share()
            low = [b for b in budgets if round(b * share) < floor]
            if low:
                raise KvorchError(
                    f"--budgets {low[0]} under {allocation.label} gives a head {round(low[0] * share)} keys, below "
                    f"{press.label()}'s sinks + window ({press.n_sink} + {protected} = {floor}); "
                    + (f"use budgets >= {math.ceil(floor / share)}, or a flatter table" if share else
                       "give every head a share above 0")
                )  # fmt: skip
    return budgets


def _check_once(option: str, values: tuple[float, ...], given: str | None = None) -> None:
    """Each value once: a repeated one would run its config twice and count its rows double."""
    seen: set[float] = set()
    for value in values:
        if value in seen:
            raise KvorchError(f"{option} {given or ','.join(f'{v:g}' for v in values)} lists {value:g} twice; "
                              "list each value once")  # fmt: skip
        seen.add(value)


def _parse_methods(methods: tuple[str, ...]) -> list[Press]:
    texts = [m.strip() for item in methods for m in _split_methods(item)]
    check_method_names(texts)  # a typo is refused before the registry imports torch
    from workers.contract.defaults import METHOD_PRESETS
    from workers.presses import REGISTRY, parse_method

    if not texts:
        raise KvorchError(f"no methods given; pass --methods all or some of: {', '.join(REGISTRY)}")
    presses: dict[Press, str] = {}  # each press, and the --methods item that gave it
    for text in texts:
        if text in METHOD_PRESETS:
            candidates = [REGISTRY[name]() for name in METHOD_PRESETS[text]]
        else:
            try:
                candidates = [parse_method(text)]
            except ValueError as exc:
                raise KvorchError(f"--methods: {exc}") from None
        for press in candidates:
            if press in presses:
                first = presses[press]
                how = "" if first == text else f" ('{first}' and '{text}' give the same config)"
                raise KvorchError(f"--methods lists {press.label()} twice{how}; list each method config once")
            presses[press] = text
    return list(presses)


def _split_methods(item: str) -> list[str]:
    """Split ``a,b:k=1,j=2,c`` on the commas that start a new method, not those between params."""
    parts: list[str] = []
    for piece in item.split(","):
        if parts and "=" in piece and ":" not in piece and ":" in parts[-1]:
            parts[-1] += "," + piece
        elif piece.strip():
            parts.append(piece)
    return parts


def _parse_thresholds(thresholds: tuple[str, ...], presses: list[Press]) -> dict[Press, tuple[float, ...]]:
    """``method=t1,t2`` (name or full label) or a plain ``t1,t2`` for every thresholded method."""
    overrides: dict[Press, tuple[float, ...]] = {}
    thresholded = [p for p in presses if p.default_thresholds != (None,)]
    for item in (part.strip() for text in thresholds for part in text.split(";")):
        if not item:
            continue
        key, eq, values = item.rpartition("=") if "=" in item else ("", "", item)
        taus = tuple(_parse_float(v, item) for v in values.split(",") if v.strip())
        if not taus:
            raise KvorchError(f"--thresholds {item!r} has no values; use method=t1,t2 or t1,t2")
        _check_once("--thresholds", taus, item)
        if not eq:
            targets = thresholded
        else:
            targets = [p for p in presses if key in (p.name, p.label())]
            if not targets:
                raise KvorchError(
                    f"--thresholds names {key!r}, which is not among --methods "
                    f"({', '.join(p.label() for p in presses)})"
                )
            fixed = [p.label() for p in targets if p not in thresholded]
            if fixed:
                raise KvorchError(f"--thresholds: {', '.join(fixed)} take no threshold; drop it from --thresholds")
        for press in targets:
            overrides[press] = taus
    return overrides


def _parse_batch_configs(value: int | str) -> int | str:
    """``auto`` or a whole number >= 1 (the CLI passes text)."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1 or str(value).strip() != str(number):
        raise KvorchError(f"--batch-configs must be auto or a whole number >= 1, got {value!r}")
    return number


def _parse_float(text: str, item: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise KvorchError(
            f"--thresholds {item!r}: {text.strip()!r} is not a number; use e.g. h2o=0.5,1 or -inf"
        ) from None
    if math.isnan(value):
        raise KvorchError(f"--thresholds {item!r}: NaN is not a threshold; use a number or -inf")
    return value


def _json_float(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return str(value)


def engine_settings(chunk_size: int, window: int, attn: str = EngineSettings.attn, **options: object) -> EngineSettings:
    """The engine's settings, or a one-line KvorchError naming the options to fix. The engine
    owns the rules (``EngineSettings.__post_init__``); every command builds its settings here, so
    a chunk size or window is validated in that one place and reported the same way."""

    try:
        return EngineSettings(chunk_size, window, attn, **options)
    except ValueError as exc:
        raise KvorchError(f"{exc}; fix --chunk-size/--window") from None
