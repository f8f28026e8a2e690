-- Users, credentials, revocations, chatflow catalogue, grants and the audit log.

CREATE TABLE users (
    id            BIGSERIAL PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE CHECK (length(username) BETWEEN 1 AND 64),
    email         TEXT,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('admin', 'user')),
    active        BOOLEAN NOT NULL DEFAULT true,
    -- Access tokens issued before this instant are no longer accepted ("revoke all").
    tokens_valid_after TIMESTAMPTZ NOT NULL DEFAULT to_timestamp(0),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Refresh tokens are stored as SHA-256 hashes; a family links every rotation of one login.
CREATE TABLE refresh_tokens (
    id          BIGSERIAL PRIMARY KEY,
    user_id     BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    token_hash  BYTEA NOT NULL UNIQUE,
    family      UUID NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL,
    rotated_at  TIMESTAMPTZ,
    revoked_at  TIMESTAMPTZ,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family);

-- API keys: `fpk_<prefix>_<secret>`; only the prefix is stored in clear.
CREATE TABLE api_keys (
    id          BIGSERIAL PRIMARY KEY,
    user_id     BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    prefix      TEXT NOT NULL UNIQUE,
    secret_hash BYTEA NOT NULL,
    name        TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at  TIMESTAMPTZ
);

-- Revoked access tokens, kept until they would have expired anyway.
CREATE TABLE revoked_tokens (
    jti         UUID PRIMARY KEY,
    expires_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE chatflows (
    id                    TEXT PRIMARY KEY,
    name                  TEXT NOT NULL DEFAULT '',
    category              TEXT,
    deployed              BOOLEAN NOT NULL DEFAULT false,
    deleted               BOOLEAN NOT NULL DEFAULT false,
    credit_cost           BIGINT CHECK (credit_cost >= 0),
    credits_per_1k_tokens BIGINT CHECK (credits_per_1k_tokens >= 0),
    max_hold              BIGINT CHECK (max_hold > 0),
    synced_at             TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE grants (
    user_id     BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    chatflow_id TEXT NOT NULL REFERENCES chatflows(id) ON DELETE CASCADE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, chatflow_id)
);

CREATE TABLE audit_log (
    id          BIGSERIAL PRIMARY KEY,
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor_id    BIGINT,
    action      TEXT NOT NULL,
    target      TEXT,
    details     JSONB NOT NULL DEFAULT '{}'::jsonb,
    request_id  TEXT
);

-- Every instance keeps an in-memory snapshot of these tables; a change anywhere
-- notifies all instances, which reload (see src/auth/snapshot.rs).
CREATE FUNCTION notify_snapshot_change() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('flowise_proxy_snapshot', TG_TABLE_NAME);
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER users_changed AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION notify_snapshot_change();
CREATE TRIGGER api_keys_changed AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION notify_snapshot_change();
CREATE TRIGGER revoked_tokens_changed AFTER INSERT OR UPDATE OR DELETE ON revoked_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION notify_snapshot_change();
CREATE TRIGGER chatflows_changed AFTER INSERT OR UPDATE OR DELETE ON chatflows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_snapshot_change();
CREATE TRIGGER grants_changed AFTER INSERT OR UPDATE OR DELETE ON grants
    FOR EACH STATEMENT EXECUTE FUNCTION notify_snapshot_change();
