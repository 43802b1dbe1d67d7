-- Two runs' comparison tables side by side, matched by config label: the value in $run_a,
-- in $run_b, and b - a. A config in only one run has nulls for the other. What to compare on comes
-- first (ΔNLL %, compressible density), so a terminal table fitted to 120 columns keeps it.
SELECT
    config,
    a.delta_nll_pct AS delta_nll_pct_a,
    b.delta_nll_pct AS delta_nll_pct_b,
    b.delta_nll_pct - a.delta_nll_pct AS delta_nll_pct_diff,
    a.density_compressible AS density_compressible_a,
    b.density_compressible AS density_compressible_b,
    b.density_compressible - a.density_compressible AS density_compressible_diff,
    a.ppl AS ppl_a,
    b.ppl AS ppl_b,
    b.ppl - a.ppl AS ppl_diff,
    a.accuracy AS accuracy_a,
    b.accuracy AS accuracy_b,
    b.accuracy - a.accuracy AS accuracy_diff,
    a.tokens AS tokens_a,
    b.tokens AS tokens_b
FROM config_metrics($run_a) a
FULL OUTER JOIN config_metrics($run_b) b USING (config)
ORDER BY config;
