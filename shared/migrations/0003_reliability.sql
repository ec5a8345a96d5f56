-- 0003: no run lost, none doubled.
--
-- `attempt` is the fencing token of a run: it goes up by one each time the run is given to a
-- worker again (handed back, presumed lost, retried later), and messages of an older attempt
-- (a late `done`, a heartbeat) change nothing. Everything here is read and written in SQL by
-- the dequeuer and the dispatcher (shared/dispatch.py), never kept in a process.

ALTER TABLE runs
    -- The worker running the current attempt is presumed gone once this passes without a
    -- heartbeat naming the attempt; each heartbeat moves it forward.
    ADD COLUMN lease_until   timestamptz,
    -- Attempts that ended without a result: the worker was lost or handed the run back.
    ADD COLUMN lost_attempts integer NOT NULL DEFAULT 0 CHECK (lost_attempts >= 0),
    -- Whole-run retries after a transient download failure (5xx, timeout, reset).
    ADD COLUMN retries       integer NOT NULL DEFAULT 0 CHECK (retries >= 0),
    -- A run waiting for a retry is not queued again before this.
    ADD COLUMN retry_at      timestamptz,
    -- Queued, no heartbeat yet, and seen absent from a drained `tasks` queue since then: the
    -- task was lost on its way (see shared/dispatch.py).
    ADD COLUMN unseen_since  timestamptz;

-- Runs the dispatcher must queue: open and not queued (new, handed back, lost, due to retry).
CREATE INDEX runs_unqueued_idx ON runs (id) WHERE status IS NULL AND queued_at IS NULL;
-- Leases to check for expiry.
CREATE INDEX runs_lease_idx ON runs (lease_until) WHERE status IS NULL AND lease_until IS NOT NULL;

-- Worker states for people (the Overseer's rule): active, inactive after a while without a
-- heartbeat, offline after longer; offline workers are pruned after a week.
ALTER TABLE workers
    ADD COLUMN status text NOT NULL DEFAULT 'active'
        CHECK (status IN ('active', 'inactive', 'offline'));

-- The status outbox gives up on what cannot succeed (a permanent 4xx from GitHub): the row is
-- kept with its error and no longer blocks the statuses after it.
ALTER TABLE statuses ADD COLUMN given_up_at timestamptz;
DROP INDEX statuses_unposted;
CREATE INDEX statuses_unposted ON statuses (id) WHERE posted_at IS NULL AND given_up_at IS NULL;
