-- Users who sign in with a token issued elsewhere (the old login service, an
-- OpenID Connect provider): one local user per external identity (issuer and
-- subject), created on first sight. The link never follows a username: a local
-- "alice" and an IdP's "alice" are different people until an admin says otherwise.

CREATE TABLE external_identities (
    issuer     TEXT NOT NULL CHECK (length(issuer) BETWEEN 1 AND 512),
    subject    TEXT NOT NULL CHECK (length(subject) BETWEEN 1 AND 255),
    user_id    BIGINT NOT NULL UNIQUE REFERENCES users(id) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (issuer, subject)
);
