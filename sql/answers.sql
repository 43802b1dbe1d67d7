-- Question tasks (documents with reference answers): per task, context length and config, the
-- questions answered, their mean score (0..1 under each document's metric), the mean paired
-- difference from the baseline config on the same questions (each question's score minus the
-- baseline's on it, over the questions both answered) with a 95 % normal interval
-- (mean ± 1.96 · sd / sqrt(pairs); null with one pair), and the mean densities of the `answers`
-- view (sql/_views.sql): generated_density over the decoding steps, prompt_density over the
-- prompt's chunks.
WITH a AS (
    SELECT * FROM answers WHERE run_id = $run_id
),
paired AS (
    SELECT
        a.method,
        a.config,
        a.task,
        a.context_length,
        a.score - b.score AS diff
    FROM a
    JOIN a b ON b.doc_id = a.doc_id AND b.method = 'baseline'
),
diffs AS (
    SELECT
        method,
        config,
        task,
        context_length,
        avg(diff) AS delta_score,
        1.959963984540054 * stddev_samp(diff) / sqrt(count(*)) AS half_width
    FROM paired
    GROUP BY method, config, task, context_length
),
scores AS (
    SELECT
        method,
        config,
        task,
        context_length,
        count(*) AS questions,
        avg(score) AS score,
        avg(generated_density) AS generated_density,
        avg(prompt_density) AS prompt_density
    FROM a
    GROUP BY method, config, task, context_length
)
SELECT
    s.method,
    s.config,
    s.task,
    s.context_length,
    s.questions,
    s.score,
    d.delta_score,
    d.delta_score - d.half_width AS ci95_low,
    d.delta_score + d.half_width AS ci95_high,
    s.generated_density,
    s.prompt_density
FROM scores s
LEFT JOIN diffs d USING (method, config, task, context_length)
ORDER BY s.task, s.context_length NULLS LAST, s.method <> 'baseline', s.config;
