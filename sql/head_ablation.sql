-- The head-aware ablation (`kvorch submit --preset head-ablation`): the run's head_aware configs
-- (and its baseline) under the study's names, with PPL, top-1 accuracy, effective context
-- (mean visible keys per query and head, so head-aware and uniform configs can be matched)
-- and the PPL change vs B_streaming_128 (4 sinks + 124 recent keys in every head).
-- Names come from the configs' parameters: A/B uniform without/with sinks, C per-class
-- contexts, E/F per-head recommended contexts without/with sinks, G confidence-gated, H inverse.
WITH params AS (
    SELECT DISTINCT config, method_params::JSON AS p FROM chunks WHERE run_id = $run_id
),
named AS (
    SELECT
        CASE
            WHEN m.method = 'baseline' THEN 'baseline_full_cache'
            WHEN p->>'policy' = 'uniform' AND (p->>'n_sink')::INT = 0 THEN 'A_window_' || (p->>'base')
            WHEN p->>'policy' = 'uniform' THEN 'B_streaming_' || (p->>'base')
            WHEN p->>'policy' = 'class' THEN
                'C_ha_pos' || (p->>'positional') || '_mix' || (p->>'mixed') || '_g' || (p->>'gathering')
                || CASE WHEN (p->>'n_sink')::INT = 0 THEN '_no_sink' ELSE '' END
            WHEN p->>'policy' = 'recommended' AND (p->>'n_sink')::INT = 0 THEN 'E_ha_no_sink'
            WHEN p->>'policy' = 'recommended' THEN 'F_ha_default'
            WHEN p->>'policy' = 'gated' THEN 'G1_conf' || (p->>'confidence') || '_base' || (p->>'base')
            WHEN p->>'policy' = 'inverse' THEN 'H3_base' || (p->>'base') || '_g' || (p->>'gathering')
        END AS name,
        m.*
    FROM config_metrics($run_id) AS m
    JOIN params USING (config)
    WHERE m.method IN ('baseline', 'head_aware')
)
SELECT
    name,
    ppl,
    100 * accuracy AS accuracy_pct,
    effective_context,
    100 * (ppl / (SELECT any_value(ppl) FROM named WHERE name = 'B_streaming_128') - 1) AS ppl_vs_b128_pct,
    config
FROM named
ORDER BY ppl, name;
