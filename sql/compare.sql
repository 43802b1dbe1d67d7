-- Method comparison: one row per config of a run. The metrics are defined once, in
-- _macros.sql (config_metrics): ΔNLL % vs baseline on the same (document, chunk) rows, so a
-- config evaluated on fewer chunks is neither flattered nor punished by which chunks it saw;
-- the three densities of docs/DESIGN.md, "Density"; agreement with the uncompressed model (KL,
-- top-1, top-5; null for runs without it); effective context = mean visible keys per query and
-- (layer, kv-head). Rows go from the densest to the sparsest by density_compressible, the
-- density to compare methods on (a method's own protected window, such as H2O's 512 keys, makes
-- the other two densities flatter it); baseline first, the structural controls last.
SELECT
    method,
    config,
    threshold,
    docs,
    tokens,
    ppl,
    delta_nll_pct,
    accuracy,
    kl,
    top1_agreement,
    top5_overlap,
    density_with_window,
    density_without_window,
    density_compressible,
    effective_context
FROM config_metrics($run_id)
ORDER BY density_compressible DESC NULLS FIRST, config;
