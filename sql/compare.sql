-- Method comparison: one row per config of a run.
-- delta_nll_pct compares each config with baseline on the same (document, chunk) rows, so a
-- config evaluated on fewer chunks is not flattered or punished by which chunks it saw.
-- Densities are ratios of sums over layers x kv-heads x chunks (DESIGN.md):
--   with window    = kept / total
--   without window = 1 - discarded outside the DMS window / keys outside it
--   compressible   = kept outside every protected region / keys outside it
WITH run AS (
    SELECT * FROM chunks WHERE run_id = $run_id
),
baseline AS (
    SELECT doc_id, chunk_index, nll_sum AS base_nll
    FROM run WHERE method = 'baseline'
)
SELECT
    run.method,
    run.config,
    any_value(run.threshold) AS threshold,
    count(DISTINCT run.doc_id) AS docs,
    sum(run.n_tokens) AS tokens,
    exp(sum(run.nll_sum) / sum(run.n_tokens)) AS ppl,
    100 * (sum(run.nll_sum) FILTER (WHERE b.base_nll IS NOT NULL) - sum(b.base_nll))
        / sum(b.base_nll) AS delta_nll_pct,
    sum(run.n_correct) / sum(run.n_tokens) AS accuracy,
    sum(run.keys_kept) / nullif(sum(run.keys_total), 0) AS density_with_window,
    1 - sum(run.keys_discarded_outside_window) / nullif(sum(run.keys_outside_window), 0)
        AS density_without_window,
    sum(run.keys_kept_unprotected) / nullif(sum(run.keys_total - run.keys_protected), 0)
        AS density_compressible
FROM run
LEFT JOIN baseline b USING (doc_id, chunk_index)
GROUP BY run.method, run.config
ORDER BY density_with_window DESC NULLS FIRST, run.config;
