-- Long generations read teacher-forced (docs/probes.md, "Long generations, teacher-forced"):
-- how compression's cost grows along a trace. Run at --chunk-size 1, every row is one token
-- and every key is decided when a decoding model would decide it, so each bucket of trace
-- positions (_macros.sql's bucket_start) shows what eviction costs that far into a generation,
-- with no sampling noise: ΔNLL % vs baseline on the same tokens, the mean KL(baseline || config)
-- and top-1 agreement of the next-token distributions (null without --agreement), and the share
-- of the uncompressed cache the config held there. Empty unless every row is one token.
WITH bucketed AS (
    SELECT *, bucket_start(chunk_start) AS bucket_start FROM run_rows($run_id)
    WHERE (SELECT max(chunk_end - chunk_start) FROM chunks WHERE run_id = $run_id) = 1
)
SELECT
    method,
    config,
    bucket_label(bucket_start) AS bucket,
    bucket_start,
    count(DISTINCT doc_id) AS traces,
    sum(n_tokens) AS tokens,
    100 * (sum(nll_sum) FILTER (WHERE base_nll IS NOT NULL) - sum(base_nll)) / nullif(sum(base_nll), 0)
        AS delta_nll_pct,
    sum(kl_sum) / nullif(sum(n_tokens) FILTER (WHERE kl_sum IS NOT NULL), 0) AS kl,
    sum(top1_agree) / nullif(sum(n_tokens) FILTER (WHERE top1_agree IS NOT NULL), 0) AS top1_agreement,
    sum(keys_kept) / nullif(sum(keys_total), 0) AS density
FROM bucketed
GROUP BY method, config, bucket_start
ORDER BY config, bucket_start;
