-- 0007: the results site (services/webhook/views/): what its pages need to stay fast with
-- millions of runs. Every list pages by keyset (an index walked from a cursor), and whatever a
-- page would otherwise compute over all runs is kept up to date here, in SQL, as runs finish.

-- Published runs: those of batch sets, and those of pushes to a branch of the sources
-- repository. A pull request's runs check a change that is not (yet) the source, so they never
-- become an entry's latest data. The one place this rule is written.
CREATE FUNCTION site_published(set_id bigint, job_id bigint) RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT $1 IS NOT NULL OR EXISTS (SELECT 1 FROM jobs WHERE id = $2 AND event = 'push') $$;

-- The order a set's or a job's runs are shown in: failures first, then what is running, what
-- waits, skipped, succeeded. Also the states the pages filter by. IMMUTABLE: it is indexed.
CREATE FUNCTION site_run_rank(status text, started_at timestamptz) RETURNS smallint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT (CASE WHEN $1 = 'failure' THEN 0
                       WHEN $1 IS NULL AND $2 IS NOT NULL THEN 1
                       WHEN $1 IS NULL THEN 2
                       WHEN $1 = 'skipped' THEN 3
                       ELSE 4 END)::smallint $$;

-- One row per layer entry that has a finished published run: its newest such run (any
-- outcome) and its newest good one (a success without a regression warning, as everywhere
-- else), with the good run's counts. The home page's totals,
-- state.txt, the sources API and the /latest/ downloads read this instead of looking for the
-- newest run of each entry among all runs. Kept by the triggers below, as runs finish.
CREATE TABLE entries (
    source_path      text NOT NULL,
    layer            text NOT NULL,
    entry_name       text NOT NULL,
    run_id           bigint NOT NULL,
    finished_at      timestamptz NOT NULL,
    status           text NOT NULL,
    good_run_id      bigint,
    good_finished_at timestamptz,
    features         bigint,
    addresses        bigint,
    PRIMARY KEY (source_path, layer, entry_name)
);

CREATE FUNCTION site_note_run() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    finished timestamptz := coalesce(NEW.finished_at, now());
BEGIN
    IF NOT site_published(NEW.set_id, NEW.job_id) THEN
        RETURN NULL;
    END IF;
    -- Runs may finish out of order (a set's run after a newer push's): the newest finish wins.
    INSERT INTO entries AS e (source_path, layer, entry_name, run_id, finished_at, status)
    VALUES (NEW.source_path, NEW.layer, NEW.entry_name, NEW.id, finished, NEW.status)
    ON CONFLICT (source_path, layer, entry_name) DO UPDATE
        SET run_id = EXCLUDED.run_id, finished_at = EXCLUDED.finished_at,
            status = EXCLUDED.status
        WHERE (EXCLUDED.finished_at, EXCLUDED.run_id) > (e.finished_at, e.run_id);
    IF NEW.status = 'success' AND NEW.warning IS NULL THEN
        UPDATE entries e
        SET good_run_id = NEW.id, good_finished_at = finished,
            features = site_count(NEW.state->'feature count'),
            addresses = site_count(NEW.state->'address count')
        WHERE (e.source_path, e.layer, e.entry_name)
              = (NEW.source_path, NEW.layer, NEW.entry_name)
          AND (e.good_finished_at IS NULL
               OR (finished, NEW.id) > (e.good_finished_at, e.good_run_id));
    END IF;
    RETURN NULL;
END $$;

-- A count from a run's index.json; anything that is not a whole number counts as unknown.
CREATE FUNCTION site_count(value jsonb) RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT CASE WHEN jsonb_typeof($1) = 'number' AND $1::text ~ '^[0-9]{1,18}$'
                      THEN $1::text::bigint END $$;

-- A run's feature count (index.json's) as a column: every list of runs shows it, and the
-- source page's chart reads it for hundreds of runs, where taking it out of each run's state
-- (a kilobyte of JSON) was most of the page's time.
ALTER TABLE runs ADD COLUMN features bigint
    GENERATED ALWAYS AS (site_count(state->'feature count')) STORED;

-- A regression warning is set after the run's status, in the same transaction
-- (services/dequeuer/regressions.py): the entry's good run is then looked for again among its
-- good runs, newest first (runs_entry_latest_idx).
CREATE FUNCTION site_note_warning() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    good record;
BEGIN
    SELECT r.id, coalesce(r.finished_at, r.created_at) AS finished,
           site_count(r.state->'feature count') AS features,
           site_count(r.state->'address count') AS addresses
    INTO good
    FROM runs r
    WHERE (r.source_path, r.layer, r.entry_name) = (NEW.source_path, NEW.layer, NEW.entry_name)
      AND r.status = 'success' AND r.warning IS NULL AND site_published(r.set_id, r.job_id)
    ORDER BY r.finished_at DESC NULLS LAST, r.id DESC
    LIMIT 1;
    UPDATE entries e
    SET good_run_id = good.id, good_finished_at = good.finished, features = good.features,
        addresses = good.addresses
    WHERE (e.source_path, e.layer, e.entry_name) = (NEW.source_path, NEW.layer, NEW.entry_name)
      AND e.good_run_id = NEW.id;
    RETURN NULL;
END $$;

CREATE TRIGGER runs_site_warned AFTER UPDATE OF warning ON runs
    FOR EACH ROW WHEN (NEW.warning IS NOT NULL AND OLD.warning IS NULL)
    EXECUTE FUNCTION site_note_warning();

CREATE TRIGGER runs_site_inserted AFTER INSERT ON runs
    FOR EACH ROW WHEN (NEW.status IS NOT NULL) EXECUTE FUNCTION site_note_run();
CREATE TRIGGER runs_site_finished AFTER UPDATE OF status ON runs
    FOR EACH ROW WHEN (NEW.status IS NOT NULL AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION site_note_run();

-- Builds the table again from every run: for this migration (runs finished before it) and
-- after a bulk load made with the triggers off (the site benchmark).
CREATE FUNCTION site_rebuild_entries() RETURNS void LANGUAGE sql AS $$
    DELETE FROM entries;
    INSERT INTO entries (source_path, layer, entry_name, run_id, finished_at, status)
    SELECT DISTINCT ON (source_path, layer, entry_name)
           source_path, layer, entry_name, id, coalesce(finished_at, created_at), status
    FROM runs
    WHERE status IS NOT NULL AND site_published(set_id, job_id)
    ORDER BY source_path, layer, entry_name, coalesce(finished_at, created_at) DESC, id DESC;
    UPDATE entries e
    SET good_run_id = g.id, good_finished_at = g.finished, features = g.features,
        addresses = g.addresses
    FROM (SELECT DISTINCT ON (source_path, layer, entry_name)
                 source_path, layer, entry_name, id, coalesce(finished_at, created_at) AS finished,
                 site_count(state->'feature count') AS features,
                 site_count(state->'address count') AS addresses
          FROM runs
          WHERE status = 'success' AND warning IS NULL AND site_published(set_id, job_id)
          ORDER BY source_path, layer, entry_name, coalesce(finished_at, created_at) DESC,
                   id DESC) g
    WHERE (e.source_path, e.layer, e.entry_name) = (g.source_path, g.layer, g.entry_name);
$$;
SELECT site_rebuild_entries();

-- Entries are current when their latest run finished after the newest finished set began:
-- every entry of the sources repository has a run in each set, so one removed from it since
-- has not, and drops out of state.txt and the totals. Without a finished set, all are current.
CREATE FUNCTION site_current_since() RETURNS timestamptz LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT coalesce((SELECT created_at FROM sets
                           WHERE finished_at IS NOT NULL AND status IS DISTINCT FROM 'error'
                           ORDER BY finished_at DESC LIMIT 1), '-infinity') $$;

-- A set's runs in the order and by the states its page shows, counted without reading the
-- table (the INCLUDE columns make the counts by state and problem an index-only scan).
CREATE INDEX runs_set_rank_idx ON runs (set_id, site_run_rank(status, started_at), id)
    INCLUDE (status, started_at, source_problem) WHERE set_id IS NOT NULL;
-- The API's runs filtered by outcome, newest first (status IS NULL: the open ones).
CREATE INDEX runs_status_id_idx ON runs (status, id);
-- A source's runs, newest first (its history page, the API's runs of a source); the columns
-- its chart draws are included, so that hundreds of runs are read from the index alone.
CREATE INDEX runs_source_id_idx ON runs (source_path, id)
    INCLUDE (layer, entry_name, status, finished_at, features, set_id, job_id, warning);
-- "Runs today" on the home page.
CREATE INDEX runs_finished_at_idx ON runs (finished_at);

-- The jobs list filtered by outcome, and by repository and pull request.
CREATE INDEX jobs_status_id_idx ON jobs (status, id);
CREATE INDEX jobs_repo_pr_idx ON jobs (repo, pr_number, id);

-- /latest/set: the newest finished set.
CREATE INDEX sets_finished_at_idx ON sets (finished_at DESC) WHERE finished_at IS NOT NULL;

-- The code version a worker runs, from its heartbeats (null until they send it).
ALTER TABLE workers ADD COLUMN version text;
