-- What each (layer, kv-head) of each config still kept when a document ended, averaged over the
-- run's documents (the view head_budgets of sql/_views.sql), one row per head: kept_share =
-- kept / the document's tokens, mean_kept the keys. What `kvorch report --plot` draws as a
-- layers x kv-heads heatmap per config (head_budgets.png); the report table head_budgets sums it
-- up per config.
SELECT config, allocation, layer, kv_head, docs, mean_kept, kept_share
FROM head_budgets
WHERE run_id = $run_id
ORDER BY config, layer, kv_head;
