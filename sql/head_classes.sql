-- Head classes of one `kvorch heads analyze` analysis ($run_id = its analysis id): heads per
-- class, how sure the classifier is (bootstrap confidence; share of documents agreeing), and
-- what each class attends to on average. far_mass is what sinks + the recent window would drop.
SELECT
    head_class,
    count(*) AS heads,
    round(100 * count(*) / sum(count(*)) OVER (), 1) AS pct,
    avg(confidence) AS mean_confidence,
    count(*) FILTER (WHERE confidence >= 0.6) AS confidence_ge_06,
    count(*) FILTER (WHERE confidence >= 0.9) AS confidence_ge_09,
    avg(doc_agreement) AS doc_agreement,
    avg(far_mass) AS far_mass,
    avg(sink_mass) AS sink_mass,
    avg(entropy) AS entropy,
    avg(mean_distance) AS mean_distance,
    median(recommended_context) FILTER (WHERE recommended_context >= 0) AS median_recommended_context,
    count(*) FILTER (WHERE recommended_context < 0) AS full_context_heads
FROM heads
WHERE run_id = $run_id
GROUP BY head_class
ORDER BY list_position(['positional', 'mixed', 'gathering'], head_class);
