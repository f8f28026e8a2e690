-- A hold never expires while its request runs: the instance serving it renews
-- `renewed_at` while the request is in flight, and the sweeper expires only
-- holds whose renewal stopped (the instance died) for HOLD_TTL_SECONDS.
ALTER TABLE holds ADD COLUMN renewed_at TIMESTAMPTZ NOT NULL DEFAULT now();
DROP INDEX IF EXISTS holds_open;
CREATE INDEX holds_open_renewed ON holds (renewed_at) WHERE state = 'open';
