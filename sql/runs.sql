-- The runs of a lake: when, which model, which methods actually wrote rows, and how the run
-- ended (status.json; a run with none is still running or was killed before writing it).
WITH written AS (
    SELECT
        run_id,
        string_agg(DISTINCT method, ',' ORDER BY method) AS methods,
        count(DISTINCT config) AS configs,
        count(*) AS rows
    FROM chunks
    GROUP BY run_id
)
SELECT
    r.run_id,
    r.created_at::VARCHAR AS created_at,
    r.model,
    w.methods,
    coalesce(w.configs, 0) AS configs,
    coalesce(w.rows, 0) AS rows,
    coalesce(s.status, 'running or killed') AS status
FROM runs r
LEFT JOIN written w USING (run_id)
LEFT JOIN statuses s USING (run_id)
ORDER BY r.created_at, r.run_id;
