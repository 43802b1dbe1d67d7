-- Views derived from the lake's tables, created once per connection after chunks and docs (not a
-- query itself: files starting with "_" are not listed by name).

-- answers: one row per (run, question document, config) of a question task: the config's
-- generated answer (on its last prompt chunk row, the only one whose `generated` is not null)
-- with the document's task, cell (context length, depth), reference answers (JSON list of
-- strings) and metric, and two densities:
--   generated_density  keys kept / keys the uncompressed model holds, over the decoding steps
--   prompt_density     kept / total keys over the document's prompt chunks for that config
--                      (density_with_window of config_metrics, over one document)
-- score is the row's answer_score (0..1 under the document's metric). Lakes without question
-- tasks, and parts older than schema version 5 (generated reads as null), give no rows.
CREATE OR REPLACE VIEW answers AS
SELECT
    g.run_id,
    g.doc_id,
    g.method,
    g.config,
    coalesce(
        g.press,
        CASE WHEN g.threshold IS NULL THEN g.config ELSE regexp_replace(g.config, '@[^@]*$', '') END
    ) AS press,
    g.policy,
    g.threshold,
    g.ratio,
    g.budget,
    d.task,
    d.context_length,
    d.depth,
    d.metric,
    d.answers,
    g.generated,
    g.n_generated,
    g.stop_reason,
    g.answer_score AS score,
    g.generated_density,
    p.prompt_density
FROM chunks g
JOIN docs d ON d.run_id = g.run_id AND d.doc_id = g.doc_id
JOIN (
    SELECT c.run_id, c.doc_id, c.config, sum(c.keys_kept) / nullif(sum(c.keys_total), 0) AS prompt_density
    FROM chunks c
    SEMI JOIN (SELECT run_id, doc_id FROM chunks WHERE generated IS NOT NULL) q USING (run_id, doc_id)
    GROUP BY c.run_id, c.doc_id, c.config
) p ON p.run_id = g.run_id AND p.doc_id = g.doc_id AND p.config = g.config
WHERE g.generated IS NOT NULL;

-- head_budgets: per (run, config, layer, kv-head), what the head still kept when a document
-- ended, over the run's documents: kept_share = mean of kept / the document's tokens, mean_kept
-- the mean keys. An allocation (workers/contract/allocation.py) shows here as budgets that move
-- between heads and layers; uniform ones as a flat table (up to what the press leaves). From the
-- last chunk row of each (document, config), the only one whose head_kept is not null; parts
-- older than schema version 6, and question tasks, give no rows.
CREATE OR REPLACE VIEW head_budgets AS
WITH layers AS (
    SELECT
        run_id, method, config, press, coalesce(allocation, 'uniform') AS allocation, doc_id,
        chunk_end AS n_tokens,
        unnest(head_kept) AS heads,
        generate_subscripts(head_kept, 1) - 1 AS layer
    FROM chunks
    WHERE head_kept IS NOT NULL
), cells AS (
    SELECT run_id, method, config, press, allocation, doc_id, n_tokens, layer,
        unnest(heads) AS kept,
        generate_subscripts(heads, 1) - 1 AS kv_head
    FROM layers
)
SELECT
    run_id,
    config,
    any_value(method) AS method,
    any_value(press) AS press,
    any_value(allocation) AS allocation,
    layer::INTEGER AS layer,
    kv_head::INTEGER AS kv_head,
    count(*) AS docs,
    avg(kept) AS mean_kept,
    avg(kept / n_tokens) AS kept_share
FROM cells
GROUP BY run_id, config, layer, kv_head;
