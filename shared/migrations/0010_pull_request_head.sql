-- 0010: GitHub's time of the change that set a pull request's stored head (the pull request's
-- updated_at, from the delivery or from GET pulls/{n}). Deliveries may reach us, or be
-- processed, out of order (GitHub does not promise order, a failed one may be sent again by
-- hand, ours are retried after a GitHub failure): an older head must not be put back over a
-- newer one, since the pull request's comment shows the newest job of the stored head.
ALTER TABLE pull_requests ADD COLUMN head_at timestamptz;
