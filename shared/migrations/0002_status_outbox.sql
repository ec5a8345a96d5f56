-- Commit statuses go through an outbox: written in the same transaction as the state change
-- that causes them, sent in order, retried while GitHub is down, never lost.
CREATE TABLE statuses (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id        bigint REFERENCES jobs (id) ON DELETE CASCADE,
    repo          text NOT NULL,
    sha           text NOT NULL,
    state         text NOT NULL CHECK (state IN ('pending', 'success', 'failure', 'error')),
    description   text NOT NULL,
    target_url    text,
    context       text NOT NULL DEFAULT 'openaddresses/machine',
    created_at    timestamptz NOT NULL DEFAULT now(),
    posted_at     timestamptz,
    attempts      integer NOT NULL DEFAULT 0,
    next_try_at   timestamptz NOT NULL DEFAULT now(),
    last_error    text
);

CREATE INDEX statuses_unposted ON statuses (id) WHERE posted_at IS NULL;
