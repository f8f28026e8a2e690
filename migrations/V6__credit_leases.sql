-- Credit leases: an instance reserves a block of a user's credits in one
-- statement (a hold with `lease = true`) and admits that user's predictions
-- against it in memory; each prediction still gets its own ledger row
-- (`charge`, or `void` with no movement), written in batches. See
-- src/ledger/lease.rs.
--
-- A lease's open remainder is `amount - captured - released`: `captured`
-- grows with its charges, `released` with what the instance gives back
-- (when recalled by another instance). Closing it (idle, recalled, shutdown)
-- releases the rest; the sweeper expires it like any hold when its instance
-- stops renewing it.
ALTER TABLE holds ADD COLUMN lease BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE holds ADD COLUMN released BIGINT NOT NULL DEFAULT 0 CHECK (released >= 0);
-- Set when another instance asked for the unused part back and this lease's
-- instance has given it (it admits no more predictions on it).
ALTER TABLE holds ADD COLUMN recalled BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE holds DROP CONSTRAINT holds_check;
ALTER TABLE holds ADD CONSTRAINT holds_within_amount
    CHECK (captured >= 0 AND COALESCE(captured, 0) + released <= amount);
CREATE INDEX holds_open_leases ON holds (user_id) WHERE state = 'open' AND lease;

-- The lease a `charge`, `void` or `release` row belongs to.
ALTER TABLE ledger ADD COLUMN lease_id UUID;
ALTER TABLE ledger DROP CONSTRAINT ledger_kind_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_check
    CHECK (kind IN ('hold', 'capture', 'void', 'expire', 'grant', 'adjust', 'lease', 'charge', 'release'));
