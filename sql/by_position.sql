-- NLL by position bucket: [0, 512), then doubling: [512, 1k), [1k, 2k), [2k, 4k), ...
-- A chunk counts in the bucket of its first position (exact when the chunk size divides 512).
-- nll is the mean per target token; delta_nll_pct compares with baseline on the same chunks.
WITH bucketed AS (
    SELECT
        *,
        CASE
            WHEN chunk_start < 512 THEN 0
            ELSE (512 * pow(2, floor(log2(chunk_start / 512))))::BIGINT
        END AS bucket_start
    FROM run_rows($run_id)
)
SELECT
    method,
    config,
    CASE WHEN bucket_start < 1024 THEN bucket_start::VARCHAR ELSE (bucket_start // 1024)::VARCHAR || 'k' END
        || '-'
        || CASE WHEN bucket_start = 0 THEN '512' ELSE (2 * bucket_start // 1024)::VARCHAR || 'k' END AS bucket,
    bucket_start,
    CASE WHEN bucket_start = 0 THEN 512 ELSE 2 * bucket_start END AS bucket_end,
    sum(n_tokens) AS tokens,
    sum(nll_sum) / nullif(sum(n_tokens), 0) AS nll,
    100 * (sum(nll_sum) FILTER (WHERE base_nll IS NOT NULL) - sum(base_nll)) / nullif(sum(base_nll), 0)
        AS delta_nll_pct,
    sum(n_correct) / nullif(sum(n_tokens), 0) AS accuracy
FROM bucketed
GROUP BY method, config, bucket_start
ORDER BY config, bucket_start;
