-- Prepaid credits: an account per user, holds per request, an append-only ledger.
--
-- Invariants (checked by `flowise-proxy ledger verify`):
--   accounts.available = sum(ledger.delta_available) per user
--   accounts.held      = sum(ledger.delta_held) per user = sum(open holds)
-- The CHECK constraints make a negative balance impossible whatever the interleaving.

CREATE TABLE accounts (
    user_id    BIGINT PRIMARY KEY REFERENCES users(id) ON DELETE RESTRICT,
    available  BIGINT NOT NULL DEFAULT 0 CHECK (available >= 0),
    held       BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- hold_id is ours (one per admitted request); request_id is the X-Request-Id for
-- correlation, which a client may choose and so cannot be trusted to be unique.
CREATE TABLE holds (
    hold_id     UUID PRIMARY KEY,
    request_id  TEXT NOT NULL,
    user_id     BIGINT NOT NULL REFERENCES accounts(user_id),
    chatflow_id TEXT,
    amount      BIGINT NOT NULL CHECK (amount >= 0),
    state       TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'captured', 'voided', 'expired')),
    captured    BIGINT CHECK (captured >= 0 AND captured <= amount),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    settled_at  TIMESTAMPTZ
);
CREATE INDEX holds_open ON holds (created_at) WHERE state = 'open';

CREATE TABLE ledger (
    id               BIGSERIAL PRIMARY KEY,
    user_id          BIGINT NOT NULL REFERENCES accounts(user_id),
    kind             TEXT NOT NULL CHECK (kind IN ('hold', 'capture', 'void', 'expire', 'grant', 'adjust')),
    delta_available  BIGINT NOT NULL,
    delta_held       BIGINT NOT NULL,
    hold_id          UUID,
    request_id       TEXT,
    idempotency_key  TEXT,
    chatflow_id      TEXT,
    reason           TEXT,
    actor_id         BIGINT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- Replaying any step changes nothing: one row per (hold, kind), one per idempotency key.
CREATE UNIQUE INDEX ledger_hold_kind ON ledger (hold_id, kind) WHERE hold_id IS NOT NULL;
CREATE UNIQUE INDEX ledger_idempotency ON ledger (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX ledger_user_time ON ledger (user_id, id DESC);

-- Conversations bound to their owner.
CREATE TABLE sessions (
    session_id   TEXT PRIMARY KEY,
    user_id      BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    chatflow_id  TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX sessions_user ON sessions (user_id, last_used_at DESC);
