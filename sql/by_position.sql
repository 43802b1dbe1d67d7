-- NLL by position bucket (_macros.sql's bucket_start: [0, 512), then doubling).
-- nll is the mean per target token; delta_nll_pct compares with baseline on the same chunks.
WITH bucketed AS (
    SELECT *, bucket_start(chunk_start) AS bucket_start FROM run_rows($run_id)
)
SELECT
    method,
    config,
    bucket_label(bucket_start) AS bucket,
    bucket_start,
    bucket_end(bucket_start) AS bucket_end,
    sum(n_tokens) AS tokens,
    sum(nll_sum) / nullif(sum(n_tokens), 0) AS nll,
    100 * (sum(nll_sum) FILTER (WHERE base_nll IS NOT NULL) - sum(base_nll)) / nullif(sum(base_nll), 0)
        AS delta_nll_pct,
    sum(n_correct) / nullif(sum(n_tokens), 0) AS accuracy
FROM bucketed
GROUP BY method, config, bucket_start
ORDER BY config, bucket_start;
