-- Login attempts, counted before the password is checked and shared by every
-- instance: one row per username and per client address, each a fixed window
-- (see src/auth/throttle.rs). Keys are SHA-256 hashes, so the table never holds
-- what someone typed as a username (it may be a password).

CREATE TABLE login_attempts (
    key_hash     BYTEA PRIMARY KEY,
    window_start TIMESTAMPTZ NOT NULL,
    count        INTEGER NOT NULL CHECK (count >= 0)
);
CREATE INDEX login_attempts_window ON login_attempts (window_start);
