-- Shared definitions, created once per connection before any named query runs (not a query
-- itself: files starting with "_" are not listed by name). Every report reads a run through
-- these, so "baseline on the same chunks", the densities and effective context are defined
-- in exactly one place.

-- A run's rows, each with the baseline's nll_sum of the same (document, chunk) as base_nll
-- (null where the run has no baseline row for that chunk).
CREATE OR REPLACE MACRO run_rows(rid) AS TABLE
    SELECT r.*, b.base_nll
    FROM chunks r
    LEFT JOIN (
        SELECT doc_id, chunk_index, nll_sum AS base_nll
        FROM chunks
        WHERE run_id = rid AND method = 'baseline'
    ) b USING (doc_id, chunk_index)
    WHERE r.run_id = rid;

-- One row per config of a run (docs/DESIGN.md, "Density"):
--   press                  the config's press without its threshold or ratio: one sweep of one
--                          method with one set of parameters (the press column; parts older
--                          than schema version 3 lack it, and only for them it is the label
--                          cut at its last '@')
--   delta_nll_pct          ΔNLL % vs baseline, summed over the (document, chunk) rows both have
--   density_with_window    kept / total
--   density_without_window 1 - discarded outside the DMS window / keys outside it
--   density_compressible   kept outside every protected region / keys outside it
--   kl                     mean per-token KL(baseline || config) of the next-token
--                          distributions, in nats (null when the run recorded no agreement)
--   top1_agreement         fraction of positions whose argmax is the baseline's
--   top5_overlap           mean |top-5 ∩ baseline's top-5| / 5
--   effective_context      mean keys a target token's query saw, per (layer, kv-head): the
--                          keys kept before its chunk plus the causal keys inside the chunk.
--                          For target position i of chunk [s, e) that is
--                          keys_kept / (layers x kv-heads) + (i - s + 1); a chunk's
--                          n_tokens targets are i = s .. s + n_tokens - 1, so the chunk adds
--                          n_tokens * kept/heads + n_tokens (n_tokens + 1) / 2. layers x
--                          kv-heads = keys_total / chunk_start (keys_total counts the s
--                          positions before the chunk once per layer and head); the first
--                          chunk has no earlier keys. Baseline's value is the mean position + 1.
CREATE OR REPLACE MACRO config_metrics(rid) AS TABLE
    SELECT
        method,
        coalesce(
            any_value(press),
            CASE WHEN any_value(threshold) IS NULL THEN config ELSE regexp_replace(config, '@[^@]*$', '') END
        ) AS press,
        config,
        any_value(threshold) AS threshold,
        any_value(ratio) AS ratio,
        any_value(budget) AS budget,
        count(DISTINCT doc_id) AS docs,
        sum(n_tokens) AS tokens,
        exp(sum(nll_sum) / sum(n_tokens)) AS ppl,
        100 * (sum(nll_sum) FILTER (WHERE base_nll IS NOT NULL) - sum(base_nll)) / sum(base_nll) AS delta_nll_pct,
        sum(n_correct) / sum(n_tokens) AS accuracy,
        sum(keys_kept) / nullif(sum(keys_total), 0) AS density_with_window,
        1 - sum(keys_discarded_outside_window) / nullif(sum(keys_outside_window), 0) AS density_without_window,
        sum(keys_kept_unprotected) / nullif(sum(keys_total - keys_protected), 0) AS density_compressible,
        sum(kl_sum) / nullif(sum(n_tokens) FILTER (WHERE kl_sum IS NOT NULL), 0) AS kl,
        sum(top1_agree) / nullif(sum(n_tokens) FILTER (WHERE top1_agree IS NOT NULL), 0) AS top1_agreement,
        sum(top5_overlap_sum) / nullif(sum(n_tokens) FILTER (WHERE top5_overlap_sum IS NOT NULL), 0) AS top5_overlap,
        sum(
            CASE WHEN keys_total = 0 THEN 0 ELSE n_tokens * keys_kept * chunk_start / keys_total END
            + n_tokens * (n_tokens + 1) / 2
        ) / nullif(sum(n_tokens), 0) AS effective_context
    FROM run_rows(rid)
    GROUP BY method, config;

-- Position buckets of by_position and traces: [0, 512), then doubling: [512, 1k), [1k, 2k), ...
-- A row counts in the bucket of its first position (exact when the chunk size divides 512).
CREATE OR REPLACE MACRO bucket_start(position) AS
    CASE WHEN position < 512 THEN 0 ELSE (512 * pow(2, floor(log2(position / 512))))::BIGINT END;

CREATE OR REPLACE MACRO bucket_end(start) AS CASE WHEN start = 0 THEN 512 ELSE 2 * start END;

CREATE OR REPLACE MACRO bucket_label(start) AS
    CASE WHEN start < 1024 THEN start::VARCHAR ELSE (start // 1024)::VARCHAR || 'k' END
        || '-'
        || CASE WHEN start = 0 THEN '512' ELSE (2 * start // 1024)::VARCHAR || 'k' END;
