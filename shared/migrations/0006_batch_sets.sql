-- 0006: the scheduler's slots, batch sets of every source, regression warnings, clean-up.

-- Each slot of the schedule runs once, whatever the restarts and failovers: its id is
-- deterministic (`batch:2026-12-04T12:00:00+00:00`) and the insert claims it. A claim left
-- unfinished (the leader died, or the database went away mid-slot) is taken again by the next
-- leader, `tries` times at most.
CREATE TABLE schedule_runs (
    slot_id     text PRIMARY KEY,
    entry       text NOT NULL,
    slot_at     timestamptz NOT NULL,
    tries       integer NOT NULL DEFAULT 1,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    outcome     text CHECK (outcome IN ('done', 'failed', 'skipped')),
    detail      text
);
CREATE INDEX schedule_runs_entry_idx ON schedule_runs (entry, slot_at DESC);

-- What a batch set was made from and what came of it.
ALTER TABLE sets
    ADD COLUMN repo       text,
    ADD COLUMN sha        text,
    ADD COLUMN reuse      boolean NOT NULL DEFAULT true,
    -- succeeded, failed, failed_by_problem, skipped, reused, warned: stored when it finishes.
    ADD COLUMN counts     jsonb,
    -- The schedule's slot that made it: a slot taken again after an interruption finds its set
    -- instead of making a second one.
    ADD COLUMN slot_id    text UNIQUE;
ALTER TABLE sets DROP CONSTRAINT IF EXISTS sets_status_check;
ALTER TABLE sets ADD CONSTRAINT sets_status_check
    CHECK (status IN ('success', 'failure', 'error', 'done'));
CREATE INDEX sets_open_idx ON sets (id) WHERE finished_at IS NULL;

-- Parsed source files by git blob SHA: a file whose content did not change since the last set
-- is neither fetched nor parsed again.
CREATE TABLE source_blobs (
    blob_sha   text PRIMARY KEY,
    path       text NOT NULL,
    source     jsonb,
    -- Why the file cannot be used (its runs fail at once naming it), when it cannot.
    problem    text,
    error      text,
    read_at    timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE runs
    -- Set when the run's counts fell by the regression threshold or more against the entry's
    -- last good run: a success with a warning, which does not replace the entry's latest good
    -- data.
    ADD COLUMN warning     text,
    -- A batch set reuses only good runs finished since then (null: any age).
    ADD COLUMN reuse_since timestamptz,
    -- Outputs removed by the clean-up (the row stays, with its state and log gone).
    ADD COLUMN purged_at   timestamptz;

-- The entry's latest good run (reuse, downloads, regressions) leaves warned runs out.
DROP INDEX runs_entry_latest_idx;
CREATE INDEX runs_entry_latest_idx
    ON runs (source_path, layer, entry_name, finished_at DESC)
    WHERE status = 'success' AND warning IS NULL;
-- Open runs of a set: is the set over?
CREATE INDEX runs_set_open_idx ON runs (set_id) WHERE status IS NULL;
