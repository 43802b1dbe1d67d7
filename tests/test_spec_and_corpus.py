"""Job spec grammar (methods, thresholds) and corpus loading, including every bad input."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.corpus import load_corpus
from orchestrator.errors import KvorchError
from orchestrator.sweep.planner import group_configs, shard
from orchestrator.sweep.spec import JobSpec, build_configs
from workers.presses import ALL_METHODS, REGISTRY


def labels(methods, thresholds=()):
    return [c.label for c in build_configs(tuple(methods), tuple(thresholds))]


def test_all_means_every_registered_method_at_its_default_thresholds():
    got = build_configs(("all",), ())
    assert [c.method for c in got] == list(ALL_METHODS)
    assert [c.threshold for c in got] == [t for m in ALL_METHODS for t in REGISTRY[m].default_thresholds]
    assert "kvzap" in REGISTRY and "kvzap" not in ALL_METHODS  # needs path=


def test_threshold_overrides_per_method_and_for_all():
    assert labels(["baseline,h2o,knorm"], ["h2o=0.5,2"]) == ["baseline", "h2o@0.5", "h2o@2", "knorm@-16"]
    assert labels(["window,random,knorm"], ["-inf"]) == ["window", "random@-inf", "knorm@-inf"]
    assert labels(["random", "knorm"], ["random=0.1;knorm=-3", "knorm=-4"]) == ["random@0.1", "knorm@-4"]


def test_ratio_policy_grid():
    configs = build_configs(("baseline,h2o,knorm",), (), "ratio", (0.3, 0.5))
    assert [c.label for c in configs] == [
        "baseline",
        "h2o@ratio=0.3",
        "h2o@ratio=0.5",
        "knorm@ratio=0.3",
        "knorm@ratio=0.5",
    ]
    for thresholds, ratios, fragment in [
        ((), (), "needs --ratios"),
        (("h2o=1",), (0.5,), "apply to --policy threshold"),
        ((), (1.5,), r"must lie in \[0, 1\)"),
    ]:
        with pytest.raises(KvorchError, match=fragment):
            build_configs(("h2o",), thresholds, "ratio", ratios)
    with pytest.raises(KvorchError, match="needs --policy ratio"):
        build_configs(("h2o",), (), "threshold", (0.5,))


def test_parameterised_methods_are_distinct_configs():
    got = labels(["expected_attention,expected_attention:n_future_positions=256,use_vnorm=false,h2o"])
    assert got == ["expected_attention@0.01", "expected_attention:n_future_positions=256,use_vnorm=false@0.01", "h2o@1"]


@pytest.mark.parametrize(
    "methods,thresholds,fragment",
    [
        (["bogus"], [], "valid methods: baseline, window"),
        ([""], [], "no methods given"),
        (["h2o"], ["h2o=abc"], "'abc' is not a number"),
        (["h2o"], ["h2o=nan"], "NaN is not a threshold"),
        (["h2o"], ["knorm=1"], "not among --methods"),
        (["baseline,h2o"], ["baseline=1"], "take no threshold"),
        (["h2o"], ["h2o="], "has no values"),
    ],
)
def test_bad_methods_and_thresholds_say_what_to_fix(methods, thresholds, fragment):
    with pytest.raises(KvorchError, match=fragment):
        build_configs(tuple(methods), tuple(thresholds))


DUPLICATES = [
    (["--policy", "budget", "--budgets", "256,256"], "--budgets 256,256 lists 256 twice; list each value once"),
    (["--thresholds", "knorm=-16,-16"], "--thresholds knorm=-16,-16 lists -16 twice; list each value once"),
    (["--thresholds", "-16,-8,-16.0"], "--thresholds -16,-8,-16.0 lists -16 twice"),
    (["--policy", "ratio", "--ratios", "0.5,0.3,0.5"], "--ratios 0.5,0.3,0.5 lists 0.5 twice"),
    (["--methods", "knorm,h2o,knorm"], "--methods lists knorm twice; list each method config once"),
    (["--methods", "all", "--methods", "knorm"], "--methods lists knorm twice ('all' and 'knorm' give the same"),
    (
        ["--methods", "expected_attention:n_future_positions=256,expected_attention:n_future_positions=256"],
        "--methods lists expected_attention:n_future_positions=256 twice",
    ),
    (["--thresholds", "knorm=-16,-16.0000001"], "two configs share the label knorm@-16 (-16.0 and -16.0000001)"),
]


@pytest.mark.parametrize(("args", "message"), DUPLICATES)
def test_a_repeated_value_or_method_config_is_refused_before_anything_runs(tmp_path, args, message):
    """Issue 28: --budgets 256,256 listed the config twice in spec.json and wrote every row twice."""
    from click.testing import CliRunner

    from orchestrator.cli import main

    methods = [] if "--methods" in args else ["--methods", "baseline,knorm"]
    lake = tmp_path / "lake"
    result = CliRunner().invoke(main, ["submit", *methods, *args, "--lake", str(lake), "--no-progress"])
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not lake.exists()


@pytest.mark.parametrize(
    "spec",
    [
        {"methods": ("all",)},
        {"methods": ("all", "knorm:n_sink=4", "expected_attention:n_future_positions=256")},
        {"methods": ("baseline,knorm,h2o",), "thresholds": ("-inf,-16,-8", "h2o=0.5,1,2")},
        {"methods": ("knorm,h2o",), "thresholds": ("knorm=-16", "knorm=-8")},  # the later item wins, once
        {"methods": ("knorm,snapkv,window",), "policy": "ratio", "ratios": (0.1, 0.5, 0.9)},
        {"methods": ("knorm,snapkv,window",), "policy": "budget", "budgets": (256, 512, 1024)},
        {"methods": ("knorm",), "densities": (0.1, 0.25)},
    ],
)
def test_no_config_appears_twice_in_spec_json(spec):
    configs = JobSpec(**spec).to_json()["configs"]
    labels = [c["config"] for c in configs]
    settings = [(c["method"], json.dumps(c["params"]), c["threshold"], c["ratio"], c["budget"]) for c in configs]
    assert len(set(labels)) == len(labels) and len(set(settings)) == len(settings), labels


def test_spec_json_round_trips_infinite_thresholds():
    spec = JobSpec(methods=("knorm",), thresholds=("-inf",), agreement=False)
    payload = json.loads(json.dumps(spec.to_json()))
    assert payload["configs"] == [
        {
            "config": "knorm@-inf",
            "method": "knorm",
            "params": {},
            "policy": "threshold",
            "threshold": "-inf",
            "ratio": None,
            "budget": None,
        }
    ]


def test_bos_is_part_of_the_spec_and_of_its_hash():
    """--bos changes the token ids, so it is in spec.json and a submission with another --bos
    never resumes this one's run."""
    from orchestrator.sweep.resume import spec_hash

    docs = pa.table({"doc_id": ["d"], "sha256": ["x"]})
    assert JobSpec(methods=("baseline",)).to_json()["bos"] == "auto"
    hashes = {spec_hash(JobSpec(methods=("baseline",), bos=b).to_json(), docs) for b in ("auto", "on", "off")}
    assert len(hashes) == 3


def test_embedded_corpus_is_long_and_deterministic():
    docs = load_corpus("pydoc")
    assert len(docs) >= 10
    assert [d.doc_id for d in docs] == [d.doc_id for d in load_corpus("pydoc")]
    assert all(len(d.text) >= 12_000 for d in docs)


def test_jsonl_parquet_and_text_dir(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"id": "a", "text": "alpha"}) + "\n\n" + json.dumps({"text": "beta"}) + "\n")
    assert [(d.doc_id, d.text) for d in load_corpus(str(jsonl))] == [("a", "alpha"), ("c-000003", "beta")]
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["x", "y"], "text": ["one", "two"]}), parquet)
    assert [d.doc_id for d in load_corpus(str(parquet))] == ["x", "y"]
    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "b.txt").write_text("bee")
    (txt / "a.txt").write_text("ay")
    assert [(d.doc_id, d.text) for d in load_corpus(str(txt))] == [("a", "ay"), ("b", "bee")]


@pytest.mark.parametrize(
    "name,content,fragment",
    [
        ("bad.jsonl", '{"text": "ok"}\n{not json}\n', r"bad.jsonl:2: not valid JSON"),
        ("notext.jsonl", '{"body": "x"}\n', r"notext.jsonl:1: no string field 'text'"),
        ("empty.jsonl", "\n", "no non-empty documents"),
        ("dup.jsonl", '{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n', "appears twice"),
        ("c.csv", "text\nx\n", "unsupported file type"),
    ],
)
def test_bad_corpora_say_what_to_fix(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(KvorchError, match=fragment):
        load_corpus(str(path))


@pytest.mark.parametrize("layout", ["jsonl", "symlink", "txt in a directory", "probe file"])
def test_a_fifo_as_corpus_is_refused_before_anything_opens_it(tmp_path, layout):
    """Issue 28: a FIFO as --corpus blocked forever with no message. In a fresh process with a
    timeout, so a regression fails the test instead of hanging the suite."""
    import os
    import subprocess
    import sys

    in_dir = layout == "txt in a directory"
    fifo = tmp_path / "docs" / "b.txt" if in_dir else tmp_path / "corpus.jsonl"
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    given = fifo.parent if in_dir else fifo
    if in_dir:
        (fifo.parent / "a.txt").write_text("a document")
    if layout == "symlink":
        given = tmp_path / "link.jsonl"
        given.symlink_to(fifo)
    if layout == "probe file":
        code = f"from orchestrator.probes.spec import check_task; check_task({str(fifo)!r})"
        expected = f"--task {fifo} is a named pipe (FIFO), not a regular file"
    else:
        code = f"from orchestrator.corpus import load_corpus; load_corpus({str(given)!r})"
        what = f"corpus file {fifo}" if layout == "txt in a directory" else f"corpus {given}"
        expected = f"{what} is a named pipe (FIFO), not a regular file: reading it would block or never end"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 1 and expected in done.stderr.strip().splitlines()[-1], done.stderr


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_a_device_as_corpus_is_refused_by_the_spec(device, tmp_path):
    link = tmp_path / "docs.jsonl"
    link.symlink_to(device)
    with pytest.raises(KvorchError, match=rf"--corpus {link} is a character device, not a regular file"):
        JobSpec(corpus=str(link), methods=("baseline",))


def test_a_fifo_corpus_stops_kvorch_submit_in_one_line_before_the_model_loads(tmp_path):
    import os
    import threading

    from click.testing import CliRunner

    from orchestrator.cli import main

    fifo, lake = tmp_path / "docs.jsonl", tmp_path / "lake"
    os.mkfifo(fifo)

    def unblock() -> None:  # a regression that opens the FIFO fails the test instead of hanging it
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader: nothing is blocked
            pass

    watchdog = threading.Timer(600, unblock)
    watchdog.start()
    try:
        result = CliRunner().invoke(main, ["submit", "--corpus", str(fifo), "--lake", str(lake), "--no-progress"])
    finally:
        watchdog.cancel()
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"--corpus {fifo} is a named pipe (FIFO)" in result.output and not lake.exists()


def test_missing_corpus_and_parquet_without_text(tmp_path):
    with pytest.raises(KvorchError, match="not found"):
        load_corpus(str(tmp_path / "nope.jsonl"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(KvorchError, match="no column 'text'"):
        load_corpus(str(tmp_path / "b.parquet"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(KvorchError, match="no .txt files"):
        load_corpus(str(tmp_path / "emptydir"))


def test_shards_balance_tokens_and_keep_every_document():
    from orchestrator.corpus import Document
    from orchestrator.sweep.planner import TokenizedDocument

    docs = [TokenizedDocument(Document(f"d{i}", "", ""), [0] * n) for i, n in enumerate([900, 500, 400, 300, 200, 100])]
    shards = shard(docs, 3)
    loads = sorted(sum(len(d.token_ids) for d in s) for s in shards)
    assert loads == [700, 800, 900]  # longest first onto the lightest shard, by hand
    assert sorted(d.document.doc_id for s in shards for d in s) == [f"d{i}" for i in range(6)]


def test_config_groups_keep_one_press_together():
    configs = build_configs(("random,knorm",), ("random=0.1,0.2,0.3", "knorm=-1,-2"))
    groups = group_configs(configs, 3)
    assert [[c.label for c in g] for g in groups] == [
        ["random@0.1", "random@0.2", "random@0.3"],
        ["knorm@-1", "knorm@-2"],
    ]
