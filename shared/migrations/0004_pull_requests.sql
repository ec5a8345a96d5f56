-- 0004: pull requests, stored deliveries, re-runs, the pull-request comment.

-- Every GitHub delivery we act on is stored by `POST /hook` in one insert before it is
-- answered; reading the changed files and creating the job happen afterwards, from here, with
-- retries, so a restart between the answer and the job loses nothing.
CREATE TABLE deliveries (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- X-GitHub-Delivery: a redelivery finds the row instead of adding one.
    delivery_id   text NOT NULL UNIQUE,
    event         text NOT NULL,
    payload       jsonb NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    attempts      integer NOT NULL DEFAULT 0,
    next_try_at   timestamptz NOT NULL DEFAULT now(),
    -- A webhook process working on the delivery holds it until then (another takes it over
    -- if that process dies).
    claimed_until timestamptz,
    processed_at  timestamptz,
    -- What came of it: job, ignored, error (with the reason in last_error).
    outcome       text CHECK (outcome IN ('job', 'ignored', 'error')),
    job_id        bigint REFERENCES jobs (id) ON DELETE SET NULL,
    last_error    text
);
CREATE INDEX deliveries_pending_idx ON deliveries (next_try_at) WHERE processed_at IS NULL;

-- What we know of each pull request: its head (for a re-run asked in a comment), its author
-- (who may ask), the one comment we keep up to date, the last re-run (at most one a minute).
CREATE TABLE pull_requests (
    repo          text NOT NULL,
    number        integer NOT NULL,
    head_sha      text,
    head_repo     text,
    base_sha      text,
    base_ref      text,
    author        text,
    comment_id    bigint,
    last_rerun_at timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (repo, number)
);

ALTER TABLE jobs
    -- The repository the head commit is read from (a fork's, for its pull requests).
    ADD COLUMN head_repo      text,
    -- The commit the changed entries are compared against.
    ADD COLUMN base_sha       text,
    -- Commit-status context of this job's statuses (STATUS_CONTEXT when it was made).
    ADD COLUMN status_context text NOT NULL DEFAULT 'openaddresses/hooked';

-- Off for a re-run asked in a comment: the run downloads and processes again even when an
-- earlier run of the same entry could be reused.
ALTER TABLE runs ADD COLUMN reuse boolean NOT NULL DEFAULT true;

-- The outbox also carries "bring the pull request's comment up to date" (kind 'comment'): sent
-- in order and retried like statuses; the comment's text is rendered when it is sent, from the
-- pull request's latest job.
ALTER TABLE statuses
    ADD COLUMN kind      text NOT NULL DEFAULT 'status' CHECK (kind IN ('status', 'comment')),
    ADD COLUMN pr_number integer;
ALTER TABLE statuses ALTER COLUMN state DROP NOT NULL;
ALTER TABLE statuses ADD CONSTRAINT statuses_kind_state_check
    CHECK ((kind = 'status') = (state IS NOT NULL));
ALTER TABLE statuses ADD CONSTRAINT statuses_comment_pr_check
    CHECK (kind = 'status' OR pr_number IS NOT NULL);
