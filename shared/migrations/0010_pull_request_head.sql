-- 0010: which stored delivery last set a pull request's head (deliveries.id, in the order they
-- arrived). A delivery processed late, after GitHub failed and it was tried again, must not put
-- an older head back over a newer one: re-runs asked in comments check the head kept here, and
-- the pull request's comment shows the newest job of that head.
ALTER TABLE pull_requests ADD COLUMN head_delivery bigint;
