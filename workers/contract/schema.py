"""The one row schema of the result lake, read by the engine, the lake writer, readers and tests.

A row is one (document, chunk, config). ``run_id`` and ``method`` are hive partition keys of
the lake path (``chunks/run_id=<id>/method=<m>/``) and are therefore not stored inside the part
files; :data:`PARTITION_COLUMNS` names them so readers can reassemble the full logical row.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 6
# Versions whose lakes this code reads (queries refuse others with the fix). Version 1 already
# holds everything the reports derive, e.g. layers x kv-heads = keys_total / chunk_start;
# version 2 adds kv_cache_bytes, version 3 press, version 4 the budget, agreement and answer
# columns (and the docs' probe columns), version 5 the generated answers of question tasks (and the
# docs' answers and metric), version 6 the allocation and each head's kept keys; each reads as null in older parts.
READABLE_SCHEMA_VERSIONS = frozenset({1, 2, 3, 4, 5, 6})

PARTITION_COLUMNS = ("run_id", "method")

CHUNK_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("chunk_index", pa.int32(), nullable=False),
        pa.field("chunk_start", pa.int32(), nullable=False),
        pa.field("chunk_end", pa.int32(), nullable=False),
        # Config identity: one label per (method, parameters, threshold); the same method with
        # other parameters is another config.
        pa.field("config", pa.string(), nullable=False),
        # The config's press without its threshold or ratio (``method[:params]``): one sweep.
        # Since schema version 3; sql/_macros.sql derives it from the label for older parts.
        pa.field("press", pa.string()),
        pa.field("method_params", pa.string(), nullable=False),  # canonical JSON
        pa.field("threshold", pa.float64()),  # null for methods without a threshold
        pa.field("policy", pa.string(), nullable=False),  # "threshold", "ratio" or "budget"
        pa.field("ratio", pa.float64()),  # compression ratio under the ratio policy, else null
        pa.field("window", pa.int32(), nullable=False),
        pa.field("n_sink", pa.int32(), nullable=False),
        pa.field("protected_window", pa.int32(), nullable=False),
        # Language-modelling quality of this chunk's predictions.
        pa.field("nll_sum", pa.float64(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("n_correct", pa.int32(), nullable=False),
        # What this chunk's queries could see, summed over layers x kv-heads (docs/DESIGN.md, "Density").
        pa.field("keys_total", pa.int64(), nullable=False),
        pa.field("keys_in_window", pa.int64(), nullable=False),
        pa.field("keys_outside_window", pa.int64(), nullable=False),
        pa.field("keys_kept", pa.int64(), nullable=False),
        pa.field("keys_discarded_outside_window", pa.int64(), nullable=False),
        pa.field("keys_protected", pa.int64(), nullable=False),
        pa.field("keys_kept_unprotected", pa.int64(), nullable=False),
        # Timing: the batched forward is shared by `batch_size` configs.
        pa.field("forward_seconds", pa.float64(), nullable=False),
        pa.field("batch_size", pa.int32(), nullable=False),
        pa.field("worker", pa.string(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        # Keys + values the batched forward held over all layers for this chunk (shared by
        # `batch_size` configs): the bytes of the cache tensors the step allocated (with the
        # held cache, every band's slots; runs made with the old --compact: the kept entries,
        # padded per layer, plus the chunk's). Since schema version 2 (null in older parts).
        pa.field("kv_cache_bytes", pa.int64()),
        # --- since schema version 4 (null in older parts) ---
        # Keys kept per (layer, kv-head) under the budget policy, sinks and window included.
        pa.field("budget", pa.int64()),
        # Agreement with the uncompressed model over this chunk's n_tokens predictions, summed
        # (docs/DESIGN.md, "Agreement"): KL(baseline || config) in nats, positions whose argmax is
        # the baseline's, and |top-5 ∩ baseline's top-5| / 5. Null when agreement is off.
        pa.field("kl_sum", pa.float64()),
        pa.field("top1_agree", pa.int32()),
        pa.field("top5_overlap_sum", pa.float64()),
        # A retrieval probe's teacher-forced answer: the answer tokens predicted in this chunk,
        # their NLL and how many were the top-1 prediction. Null for corpus documents.
        pa.field("answer_nll_sum", pa.float64()),
        pa.field("answer_tokens", pa.int32()),
        pa.field("answer_correct", pa.int32()),
        # --- since schema version 5 (null in older parts) ---
        # A question task's generated answer, on the config's last prompt chunk row (null on the
        # others and for documents that are no question): the greedy text, its tokens (a stop
        # token included), why it stopped ("eos" or "length"), its score under the document's
        # metric (workers/contract/scorers.py), and keys kept over keys the uncompressed model
        # holds, summed over the decoding steps.
        pa.field("generated", pa.string()),
        pa.field("n_generated", pa.int32()),
        pa.field("stop_reason", pa.string()),
        pa.field("answer_score", pa.float64()),
        pa.field("generated_density", pa.float64()),
        # --- since schema version 6 (null in older parts, which are all uniform) ---
        # How a ranked config's ratio or budget is shared between (layer, kv-head)s
        # (workers/contract/allocation.py): "uniform", "adakv", "pyramidkv", "file=NAME"; the
        # press column then ends with "+<allocation>" when not uniform (one sweep each).
        pa.field("allocation", pa.string()),
        # On a config's last chunk row of a document (null elsewhere, and for question tasks):
        # [layers][kv-heads] the keys each head still kept when the document ended (the view
        # head_budgets in sql/_views.sql averages their share of the document).
        pa.field("head_kept", pa.list_(pa.list_(pa.int32()))),
    ],
    metadata={"kvorch_schema_version": str(SCHEMA_VERSION)},
)
# The columns a question task's generation fills (the rest of a row is the prompt's chunk).
GENERATION_COLUMNS = ("generated", "n_generated", "stop_reason", "answer_score", "generated_density")
# The columns of a part under each readable version: readers accept any of them, and the
# columns an older part lacks read as null.
_V6 = CHUNK_SCHEMA.remove_metadata()
_V5 = pa.schema(list(_V6)[: _V6.get_field_index("allocation")])
_V4 = pa.schema(list(_V5)[: _V5.get_field_index("generated")])
_V3 = pa.schema(list(_V4)[: _V4.get_field_index("budget")])
_V2 = _V3.remove(_V3.get_field_index("press"))
CHUNK_COLUMNS_BY_VERSION = {
    6: _V6,
    5: _V5,
    4: _V4,
    3: _V3,
    2: _V2,
    1: _V2.remove(_V2.get_field_index("kv_cache_bytes")),
}

DOC_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("n_chars", pa.int64(), nullable=False),
        pa.field("n_tokens", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        # A retrieval probe's identity (orchestrator/probes/), since schema version 4; null for
        # corpus documents. The answer is the document's last answer_tokens tokens.
        pa.field("task", pa.string()),
        pa.field("context_length", pa.int32()),
        pa.field("depth", pa.float64()),
        pa.field("answer", pa.string()),
        pa.field("answer_tokens", pa.int32()),
        # A question task's reference answers (a JSON list of strings) and the metric that scores
        # a generated answer against them, since schema version 5; null for other documents.
        pa.field("answers", pa.string()),
        pa.field("metric", pa.string()),
    ],
    metadata={"kvorch_schema_version": str(SCHEMA_VERSION)},
)

# What an engine returns: the file columns plus the `method` partition key, so the lake writer
# can route each row to its partition.
ROW_SCHEMA = CHUNK_SCHEMA.append(pa.field("method", pa.string(), nullable=False))

# `kvorch scores`: every key's last score and final keep decision, for one document.
SCORES_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("config", pa.string(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("kv_head", pa.int32(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("kept", pa.bool_(), nullable=False),
    ],
    metadata={"kvorch_schema_version": str(SCHEMA_VERSION)},
)

# `kvorch heads analyze`: one row per (layer, query head) of a model, written to
# heads/run_id=<id>/heads.parquet. Masses are mean fractions of a query's attention over the
# analysed queries; `recent_mass` excludes the sinks, so sink + recent + far = 1.
HEAD_CLASSES = ("positional", "mixed", "gathering")
HEADS_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("head", pa.int32(), nullable=False),
        pa.field("kv_head", pa.int32(), nullable=False),
        pa.field("n_docs", pa.int32(), nullable=False),
        pa.field("n_queries", pa.int64(), nullable=False),
        pa.field("entropy", pa.float64(), nullable=False),  # normalized by log(visible keys), in [0, 1]
        pa.field("mean_distance", pa.float64(), nullable=False),  # tokens between query and key
        pa.field("sink_mass", pa.float64(), nullable=False),
        pa.field("recent_mass", pa.float64(), nullable=False),
        pa.field("far_mass", pa.float64(), nullable=False),  # what sinks + the recent window miss
        pa.field("head_class", pa.string(), nullable=False),  # one of HEAD_CLASSES
        pa.field("confidence", pa.float64(), nullable=False),  # bootstrap probability of head_class
        pa.field("p_positional", pa.float64(), nullable=False),
        pa.field("p_mixed", pa.float64(), nullable=False),
        pa.field("p_gathering", pa.float64(), nullable=False),
        pa.field("doc_agreement", pa.float64(), nullable=False),  # share of documents alone giving head_class
        pa.field("recommended_context", pa.int32(), nullable=False),  # sinks + window; -1: full context
    ],
    metadata={"kvorch_schema_version": str(SCHEMA_VERSION)},
)
