-- 0009: a finished set's stored counts gain `by_problem` (every run with a problem code,
-- failed or skipped, by code), which shared/sets.py now stores when a set finishes. The results
-- site reads a finished set's page counts from `sets.counts` instead of counting its runs;
-- sets that finished before this migration get theirs here. A finished set's runs never
-- change again (no run goes back to open), so the counts stay true.
UPDATE sets s
SET counts = s.counts || jsonb_build_object('by_problem', coalesce((
    SELECT jsonb_object_agg(p.problem, p.n)
    FROM (SELECT source_problem AS problem, count(*) AS n FROM runs
          WHERE set_id = s.id AND source_problem IS NOT NULL GROUP BY 1) p
), '{}'::jsonb))
WHERE s.finished_at IS NOT NULL AND s.counts IS NOT NULL AND NOT s.counts ? 'by_problem';
