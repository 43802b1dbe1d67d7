-- Throughput of a run, per worker, per method and per device type. A batched forward serves
-- `batch_size` configs at once, so each row is charged forward_seconds / batch_size: the
-- seconds add up to the real forward time, and token_configs_per_s counts one token through
-- one config's forward once (chunk_end - chunk_start tokens per row).
-- device_name (the GPU model, or the CPU) comes from the workers recorded in status.json;
-- rows of a run without one fall back to the row's device (cpu, cuda:0, ...).
-- peak_kv_mib: the most keys + values any one batched forward held (kv_cache_bytes, all layers;
-- the bytes of the cache tensors the step allocated: the document's length uncompiled, its
-- length bucket compiled; runs made with the old --compact held only kept entries); null for
-- rows written before schema version 2.
-- compile_seconds: what compiling chunk steps took on a worker (status.json; torch.compile's
-- warm-up chunk included), kept out of `seconds`; per device the sum over its workers, per
-- method null (a compile serves a whole batch of configs); null for runs recorded before it was.
WITH rows_ AS (
    SELECT
        r.worker,
        r.method,
        coalesce(w.device_name, r.device) AS device_name,
        r.chunk_end - r.chunk_start AS token_configs,
        r.forward_seconds / r.batch_size AS seconds,
        r.kv_cache_bytes,
        w.compile_seconds,
        row_number() OVER (PARTITION BY r.worker) = 1 AS first_of_worker
    FROM chunks r
    LEFT JOIN workers w ON w.run_id = r.run_id AND w.worker = r.worker
    WHERE r.run_id = $run_id
)
SELECT
    CASE WHEN grouping(worker) = 0 THEN 'worker' WHEN grouping(method) = 0 THEN 'method' ELSE 'device' END AS per,
    worker,
    method,
    device_name,
    count(*) AS rows,
    sum(token_configs) AS token_configs,
    sum(seconds) AS seconds,
    sum(token_configs) / nullif(sum(seconds), 0) AS token_configs_per_s,
    max(kv_cache_bytes) / 2 ^ 20 AS peak_kv_mib,
    CASE WHEN grouping(method) = 0 THEN NULL ELSE sum(compile_seconds) FILTER (WHERE first_of_worker) END
        AS compile_seconds
FROM rows_
GROUP BY GROUPING SETS ((worker, device_name), (method), (device_name))
ORDER BY per DESC, worker, method, device_name;
