"""What kvorch's orchestration costs on top of the evaluation itself.

The same work twice: (a) ``kvorch submit`` into a fresh temporary lake followed by
``kvorch report``, each a fresh process as a user runs them (interpreter start, imports, Ray
start, actor and model load, tokenizing, planning, Parquet writes, DuckDB); (b) the bare Engine
in this process over the same tokenized documents, the same config groups (the run's resolved
``--batch-configs``), dtype, threads and engine settings, read back from the run's spec.json.
Overhead = 1 - (b) / (a). Model loading is shown apart in (b) because (a) pays it too.

    python bench/orchestration_overhead.py [--max-docs 4] [--max-tokens 1024] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from orchestrator.corpus import EMBEDDED_CORPUS, load_corpus
from orchestrator.sweep.planner import group_configs
from orchestrator.sweep.spec import build_configs
from workers.contract import tokenization
from workers.contract.configs import EvalConfig
from workers.contract.models import EMBEDDED_MODEL, load_model
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine
from workers.presses.baseline import BaselinePress

KVORCH = [sys.executable, "-c", "import sys; from orchestrator.cli import main; sys.exit(main())"]


def timed_process(args: list[str]) -> float:
    """Wall seconds of one ``kvorch`` command in a fresh process; its output is discarded."""
    tic = time.perf_counter()
    subprocess.run([*KVORCH, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return time.perf_counter() - tic


def bare_engine(spec: dict, corpus: str) -> tuple[float, float]:
    """(model load seconds, evaluation seconds) of the run's work in this process, no Ray, no lake."""
    torch.set_num_threads(int(spec["hardware"]["cpus_per_actor"]))
    device = spec["hardware"]["device"]
    tic = time.perf_counter()
    model = load_model(spec["model"], spec["dtype_resolved"], device)
    tokens = tokenization.load(spec["model"], spec.get("bos", tokenization.DEFAULT_BOS))
    loaded = time.perf_counter() - tic
    documents = load_corpus(corpus)[: spec["max_docs"]]
    docs = [(d.doc_id, tokens.ids(d.text, spec["max_tokens"])) for d in documents]
    configs = build_configs(
        tuple(spec["methods"]),
        tuple(spec["thresholds"]),
        spec["policy"],
        tuple(spec["ratios"]),
        tuple(spec.get("budgets", ())),
        spec["window"],
    )
    agreement = spec.get("agreement", False)
    if agreement and not any(c.is_baseline for c in configs):
        configs.insert(0, EvalConfig(BaselinePress()))
    settings = EngineSettings(
        spec["chunk_size"],
        spec["window"],
        spec["attn"],
        compile=spec["compile_resolved"],
        agreement=agreement,
    )
    engine = Engine(model, settings)
    tic = time.perf_counter()
    for group in group_configs(configs, spec["batch_configs_resolved"], agreement):
        for doc_id, ids in docs:
            engine.evaluate(doc_id, torch.tensor(ids), group)
    return loaded, time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--corpus", default=EMBEDDED_CORPUS)
    parser.add_argument("--methods", default="baseline,streaming_llm,knorm,h2o")
    parser.add_argument("--max-docs", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--extra", default="", help="More submit options, e.g. '--compile on --batch-configs 4'.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kvorch-overhead-") as tmp:
        lake = str(Path(tmp) / "lake")
        job = ["--model", args.model, "--corpus", args.corpus, "--methods", args.methods]
        job += ["--max-docs", str(args.max_docs), "--max-tokens", str(args.max_tokens)]
        job += ["--chunk-size", str(args.chunk_size), "--window", str(args.window), *args.extra.split()]
        submit = timed_process(["submit", *job, "--lake", lake, "--run-id", "bench", "--no-progress"])
        report = timed_process(["report", "--lake", lake, "--run", "bench"])
        spec = json.loads((Path(lake) / "runs" / "run_id=bench" / "spec.json").read_text())
    loaded, evaluated = bare_engine(spec, args.corpus)

    kvorch_total, bare_total = submit + report, loaded + evaluated
    print(f"# {platform.processor() or platform.machine()}, {spec['hardware']['device']}, "
          f"{spec['hardware']['cpus_per_actor']} threads, torch {torch.__version__}, {spec['dtype_resolved']}, "
          f"{args.max_docs} docs x {args.max_tokens} tokens, {len(spec['configs'])} configs "
          f"({spec['batch_configs_resolved']} per forward), chunk {args.chunk_size}, window {args.window}, "
          f"compile {spec['compile_resolved']}")  # fmt: skip
    table = [
        ("kvorch submit (fresh process)", submit),
        ("kvorch report (fresh process)", report),
        ("kvorch submit + report", kvorch_total),
        ("bare engine: load model", loaded),
        ("bare engine: evaluate", evaluated),
        ("bare engine total", bare_total),
    ]
    print(f"{'mode':<32} {'seconds':>8}")
    for name, seconds in table:
        print(f"{name:<32} {seconds:>8.2f}")
    overhead = kvorch_total - bare_total
    print(f"orchestration overhead: {overhead:.2f} s = {overhead / kvorch_total:.1%} of kvorch's wall time")


if __name__ == "__main__":
    main()
