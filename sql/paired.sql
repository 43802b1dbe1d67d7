-- Per-document paired differences: each document's ΔNLL % vs baseline (on the chunks both
-- have), then per config the mean over documents, its standard error, and a 95 % Student t
-- interval (mean ± t(0.975, docs - 1) · stderr; t from the table below for 1-30 degrees of
-- freedom, beyond that the Cornish-Fisher expansion, within 2e-4 of the exact quantile).
-- wins / losses / ties count documents where the config's ΔNLL is lower / higher / equal
-- than the reference config's ($reference) on the same document.
-- The agreement with the uncompressed model gets the same treatment: each document's mean
-- per-token KL and top-1 agreement, then their mean over documents with a 95 % t interval
-- (null for runs recorded without agreement). A KL is never below 0 and an agreement never
-- outside [0, 1], so their intervals are clipped there (with few documents the t interval
-- would reach past them).
WITH per_doc AS (
    SELECT
        method,
        config,
        doc_id,
        100 * (sum(nll_sum) - sum(base_nll)) / nullif(sum(base_nll), 0) AS delta_nll_pct,
        sum(kl_sum) / nullif(sum(n_tokens), 0) AS kl,
        sum(top1_agree) / nullif(sum(n_tokens), 0) AS top1
    FROM run_rows($run_id)
    WHERE base_nll IS NOT NULL
    GROUP BY method, config, doc_id
),
reference AS (
    SELECT doc_id, delta_nll_pct AS reference_pct FROM per_doc WHERE config = $reference
),
t_975(df, t) AS (
    VALUES (1, 12.7062047), (2, 4.3026527), (3, 3.1824463), (4, 2.7764451), (5, 2.5705818),
        (6, 2.4469119), (7, 2.3646243), (8, 2.3060041), (9, 2.2621572), (10, 2.2281389),
        (11, 2.2009852), (12, 2.1788128), (13, 2.1603687), (14, 2.1447867), (15, 2.1314495),
        (16, 2.1199053), (17, 2.1098155), (18, 2.1009220), (19, 2.0930241), (20, 2.0859634),
        (21, 2.0796138), (22, 2.0738731), (23, 2.0686576), (24, 2.0638986), (25, 2.0595386),
        (26, 2.0555294), (27, 2.0518305), (28, 2.0484071), (29, 2.0452296), (30, 2.0422725)
),
stats AS (
    SELECT
        p.method,
        p.config,
        count(*) AS docs,
        avg(p.delta_nll_pct) AS mean_delta_nll_pct,
        stddev_samp(p.delta_nll_pct) / sqrt(count(*)) AS stderr,
        avg(p.kl) AS mean_kl,
        stddev_samp(p.kl) / sqrt(count(p.kl)) AS kl_stderr,
        avg(p.top1) AS mean_top1_agreement,
        stddev_samp(p.top1) / sqrt(count(p.top1)) AS top1_stderr,
        count(*) FILTER (WHERE p.delta_nll_pct < r.reference_pct) AS wins,
        count(*) FILTER (WHERE p.delta_nll_pct > r.reference_pct) AS losses,
        count(*) FILTER (WHERE p.delta_nll_pct = r.reference_pct) AS ties
    FROM per_doc p
    LEFT JOIN reference r USING (doc_id)
    GROUP BY p.method, p.config
),
z(v) AS (SELECT 1.959963984540054)
SELECT
    s.method,
    s.config,
    s.docs,
    s.mean_delta_nll_pct,
    s.stderr,
    s.mean_delta_nll_pct - q.t * s.stderr AS ci95_low,
    s.mean_delta_nll_pct + q.t * s.stderr AS ci95_high,
    s.wins,
    s.losses,
    s.ties,
    s.mean_kl,
    CASE WHEN s.mean_kl - q.t * s.kl_stderr < 0 THEN 0 ELSE s.mean_kl - q.t * s.kl_stderr END AS kl_ci95_low,
    s.mean_kl + q.t * s.kl_stderr AS kl_ci95_high,
    s.mean_top1_agreement,
    CASE WHEN s.mean_top1_agreement - q.t * s.top1_stderr < 0 THEN 0
        ELSE s.mean_top1_agreement - q.t * s.top1_stderr END AS top1_ci95_low,
    CASE WHEN s.mean_top1_agreement + q.t * s.top1_stderr > 1 THEN 1
        ELSE s.mean_top1_agreement + q.t * s.top1_stderr END AS top1_ci95_high
FROM stats s
LEFT JOIN (
    SELECT
        df,
        coalesce(
            (SELECT t FROM t_975 WHERE t_975.df = d.df),
            v + (v ^ 3 + v) / (4 * df) + (5 * v ^ 5 + 16 * v ^ 3 + 3 * v) / (96 * df ^ 2)
                + (3 * v ^ 7 + 19 * v ^ 5 + 17 * v ^ 3 - 15 * v) / (384 * df ^ 3)
        ) AS t
    FROM (SELECT DISTINCT docs - 1 AS df FROM stats WHERE docs > 1) d, z
) q ON q.df = s.docs - 1
ORDER BY s.mean_delta_nll_pct, s.config;
