-- 0001: jobs (GitHub pushes / pull requests), sets (batches), runs (one layer entry of one
-- source at one commit) and workers (last heartbeat of each worker process).
--
-- status columns are NULL while the thing is open so that "settle once" is a plain
-- `UPDATE ... WHERE status IS NULL` guard.

CREATE TABLE jobs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- X-GitHub-Delivery: a redelivered webhook finds its job instead of creating another.
    delivery_id text UNIQUE,
    event       text NOT NULL,
    repo        text NOT NULL,
    sha         text NOT NULL,
    ref         text,
    pr_number   integer,
    status      text CHECK (status IN ('success', 'failure', 'error')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    state       jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX jobs_created_at_idx ON jobs (created_at DESC);
CREATE INDEX jobs_open_idx ON jobs (id) WHERE status IS NULL;

CREATE TABLE sets (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text NOT NULL DEFAULT 'weekly',
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    status      text CHECK (status IN ('success', 'failure', 'error')),
    state       jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX sets_created_at_idx ON sets (created_at DESC);

CREATE TABLE runs (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id         bigint REFERENCES jobs (id) ON DELETE CASCADE,
    set_id         bigint REFERENCES sets (id) ON DELETE CASCADE,
    source_path    text NOT NULL,
    layer          text NOT NULL
                   CHECK (layer IN ('addresses', 'parcels', 'buildings', 'centerlines')),
    entry_name     text NOT NULL,
    commit_sha     text,
    source         jsonb,
    status         text CHECK (status IN ('success', 'failure', 'skipped')),
    source_problem text,
    error          text,
    attempt        integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    worker         text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    queued_at      timestamptz,
    started_at     timestamptz,
    finished_at    timestamptz,
    deadline_at    timestamptz,
    outputs        jsonb NOT NULL DEFAULT '{}',
    state          jsonb NOT NULL DEFAULT '{}',
    -- Hash of the downloaded data and the HTTP validators, so a later run can skip work when
    -- nothing changed upstream.
    fingerprint    text,
    etag           text,
    last_modified  text
);
CREATE INDEX runs_job_id_idx ON runs (job_id);
CREATE INDEX runs_set_id_idx ON runs (set_id);
-- "Latest successful run of this entry" (previews, caches, the weekly set's skip logic).
CREATE INDEX runs_entry_latest_idx
    ON runs (source_path, layer, entry_name, finished_at DESC)
    WHERE status = 'success';
CREATE INDEX runs_entry_idx ON runs (source_path, layer, entry_name, finished_at DESC);
-- Open runs: the dequeuer and the deadline sweep look only at these.
CREATE INDEX runs_open_idx ON runs (deadline_at) WHERE status IS NULL;

CREATE TABLE workers (
    name         text PRIMARY KEY,
    hostname     text NOT NULL,
    pid          integer NOT NULL,
    state        text NOT NULL DEFAULT 'idle' CHECK (state IN ('idle', 'running', 'stopping')),
    run_id       bigint,
    started_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workers_last_seen_at_idx ON workers (last_seen_at DESC);
