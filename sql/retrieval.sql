-- Retrieval probes (kvorch submit --task): per config and probe cell (task, context length,
-- insertion depth), the share of probes answered exactly (every teacher-forced answer token
-- was the top-1 prediction, i.e. greedy decoding would produce the answer) and the answer
-- tokens' mean NLL. A probe's answer may straddle chunks: its sums are taken over all of them.
-- The probe cells come from the docs table (orchestrator/probes/); corpus documents have no
-- answer and are left out. Bring-your-own probes (task custom) have no cells of their own (each
-- its own length, a depth only when given): each is its own row, named in ``probe``.
WITH per_probe AS (
    SELECT
        c.method,
        c.config,
        d.task,
        d.context_length,
        d.depth,
        CASE WHEN d.task = 'custom' THEN c.doc_id END AS probe,
        c.doc_id,
        sum(c.answer_tokens) AS answer_tokens,
        sum(c.answer_correct) AS answer_correct,
        sum(c.answer_nll_sum) AS answer_nll_sum
    FROM chunks c
    JOIN docs d ON d.run_id = c.run_id AND d.doc_id = c.doc_id
    WHERE c.run_id = $run_id AND c.answer_tokens IS NOT NULL
    GROUP BY c.method, c.config, d.task, d.context_length, d.depth, probe, c.doc_id
)
SELECT
    method,
    config,
    task,
    context_length,
    depth,
    probe,
    count(*) AS probes,
    avg(CASE WHEN answer_correct = answer_tokens THEN 1.0 ELSE 0.0 END) AS accuracy,
    sum(answer_nll_sum) / nullif(sum(answer_tokens), 0) AS answer_nll
FROM per_probe
GROUP BY method, config, task, context_length, depth, probe
ORDER BY config, task, context_length, depth NULLS LAST, probe;
