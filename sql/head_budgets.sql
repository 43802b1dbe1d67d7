-- Per config: how unevenly its heads kept keys at a document's end (the view head_budgets of
-- sql/_views.sql, mean over documents): the smallest, mean and largest share of a document's
-- keys one (layer, kv-head) kept, and largest / smallest. An allocation (--allocation) moves
-- budgets between heads and layers at the same mean; `kvorch report --plot` draws every head
-- (head_budgets.png, from sql/head_budget_cells.sql).
SELECT
    config,
    any_value(allocation) AS allocation,
    max(docs) AS docs,
    count(*) AS heads,
    min(kept_share) AS min_share,
    avg(kept_share) AS mean_share,
    max(kept_share) AS max_share,
    max(kept_share) / nullif(min(kept_share), 0) AS max_over_min
FROM head_budgets
WHERE run_id = $run_id
GROUP BY config
ORDER BY config;
