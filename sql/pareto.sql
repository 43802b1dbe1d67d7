-- Every config of a run as a point (compressible density, ΔNLL % vs baseline), with its
-- sweep (`press`: the config label without its threshold). A config is on the Pareto
-- frontier when no other config is at most as dense and at most as costly and strictly
-- better in one of the two (lower density = more compression, lower ΔNLL = better).
WITH points AS MATERIALIZED (
    SELECT method, press, config, threshold, density_compressible, delta_nll_pct
    FROM config_metrics($run_id)
    WHERE density_compressible IS NOT NULL AND delta_nll_pct IS NOT NULL
)
SELECT
    p.*,
    NOT EXISTS (
        SELECT 1
        FROM points q
        WHERE q.density_compressible <= p.density_compressible
          AND q.delta_nll_pct <= p.delta_nll_pct
          AND (q.density_compressible < p.density_compressible OR q.delta_nll_pct < p.delta_nll_pct)
    ) AS on_frontier
FROM points p
ORDER BY p.press, p.density_compressible, p.config;
