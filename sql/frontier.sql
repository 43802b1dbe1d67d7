-- Iso-density comparison: each threshold sweep's ΔNLL % at the same compressible densities
-- ($densities), so methods are compared at equal memory rather than at their own thresholds.
-- A sweep is one press (method + parameters) at several thresholds; its points are
-- (density_compressible, delta_nll_pct) per config, points of equal density averaged.
-- For each target density the value is interpolated linearly between the two sweep points
-- that bracket it (piecewise-linear interpolation is monotone: it never leaves the range of
-- its two neighbours, unlike a spline). No extrapolation: a target outside the sweep's
-- density range has no value and status 'out of range'. `best` marks, per target density,
-- the sweep(s) with the lowest ΔNLL among those in range: the iso-density frontier.
-- Configs with a threshold, a ratio or a token budget form sweeps; fixed methods are points in
-- pareto.sql.
WITH points AS MATERIALIZED (
    SELECT press, any_value(method) AS method, density_compressible AS density, avg(delta_nll_pct) AS delta
    FROM config_metrics($run_id)
    WHERE coalesce(threshold, ratio, budget) IS NOT NULL AND density_compressible IS NOT NULL AND delta_nll_pct IS NOT NULL
    GROUP BY press, density_compressible
),
targets AS (
    SELECT DISTINCT unnest($densities::DOUBLE[]) AS target
),
brackets AS (
    SELECT
        p.press,
        any_value(p.method) AS method,
        t.target,
        count(*) AS sweep_points,
        max(p.density) FILTER (WHERE p.density <= t.target) AS lower_density,
        min(p.density) FILTER (WHERE p.density >= t.target) AS upper_density
    FROM points p
    CROSS JOIN targets t
    GROUP BY p.press, t.target
),
interpolated AS (
    SELECT
        b.*,
        CASE
            WHEN lo.delta IS NULL OR hi.delta IS NULL THEN NULL
            WHEN b.upper_density = b.lower_density THEN lo.delta
            ELSE lo.delta + (hi.delta - lo.delta) * (b.target - b.lower_density) / (b.upper_density - b.lower_density)
        END AS delta_nll_pct,
        CASE
            WHEN lo.delta IS NULL OR hi.delta IS NULL THEN 'out of range'
            WHEN b.upper_density = b.lower_density THEN 'measured'
            ELSE 'interpolated'
        END AS status
    FROM brackets b
    LEFT JOIN points lo ON lo.press = b.press AND lo.density = b.lower_density
    LEFT JOIN points hi ON hi.press = b.press AND hi.density = b.upper_density
)
SELECT
    target AS density,
    method,
    press,
    delta_nll_pct,
    status,
    lower_density,
    upper_density,
    sweep_points,
    coalesce(delta_nll_pct = min(delta_nll_pct) OVER (PARTITION BY target), false) AS best
FROM interpolated
ORDER BY target, delta_nll_pct NULLS LAST, press;
