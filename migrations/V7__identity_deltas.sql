-- Identity changes as deltas (issue 10: a million users).
--
-- V1 notified the table name once per statement, and every instance reloaded
-- every user, key, grant and revoked id on every change anywhere. Now each
-- changed row names itself on channel `flowise_proxy_identity`, and instances
-- re-read only those rows (src/auth/snapshot.rs):
--   u:<user id>      a user (role, active, tokens_valid_after; created or deleted)
--   g:<user id>      the grants of a user
--   k:<key prefix>   an API key (created, revoked, deleted)
--   r:<revoked id>   a revoked access-token id or login family
--   c:<chatflow id>  the chatflow catalogue
--   full             anything else (TRUNCATE): instances reload everything
-- An UPDATE that moves a row to another key names the old key too. Identical
-- payloads within one transaction are delivered once (PostgreSQL folds them).

DROP TRIGGER users_changed ON users;
DROP TRIGGER api_keys_changed ON api_keys;
DROP TRIGGER revoked_tokens_changed ON revoked_tokens;
DROP TRIGGER chatflows_changed ON chatflows;
DROP TRIGGER grants_changed ON grants;
DROP FUNCTION notify_snapshot_change();

CREATE FUNCTION notify_identity_row() RETURNS trigger AS $$
DECLARE
    r record;
    payload text;
BEGIN
    FOR pass IN 1..2 LOOP
        IF pass = 1 THEN
            IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
        ELSE
            EXIT WHEN TG_OP <> 'UPDATE';
            r := OLD;
        END IF;
        CASE TG_TABLE_NAME
            WHEN 'users' THEN payload := 'u:' || r.id;
            WHEN 'grants' THEN payload := 'g:' || r.user_id;
            WHEN 'api_keys' THEN payload := 'k:' || r.prefix;
            WHEN 'revoked_tokens' THEN payload := 'r:' || r.jti;
            WHEN 'chatflows' THEN payload := 'c:' || r.id;
            ELSE payload := 'full';
        END CASE;
        PERFORM pg_notify('flowise_proxy_identity', payload);
    END LOOP;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE FUNCTION notify_identity_truncate() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('flowise_proxy_identity', 'full');
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER users_changed AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION notify_identity_row();
CREATE TRIGGER api_keys_changed AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION notify_identity_row();
CREATE TRIGGER revoked_tokens_changed AFTER INSERT OR UPDATE OR DELETE ON revoked_tokens
    FOR EACH ROW EXECUTE FUNCTION notify_identity_row();
CREATE TRIGGER chatflows_changed AFTER INSERT OR UPDATE OR DELETE ON chatflows
    FOR EACH ROW EXECUTE FUNCTION notify_identity_row();
CREATE TRIGGER grants_changed AFTER INSERT OR UPDATE OR DELETE ON grants
    FOR EACH ROW EXECUTE FUNCTION notify_identity_row();

CREATE TRIGGER users_truncated AFTER TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION notify_identity_truncate();
CREATE TRIGGER api_keys_truncated AFTER TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION notify_identity_truncate();
CREATE TRIGGER revoked_tokens_truncated AFTER TRUNCATE ON revoked_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION notify_identity_truncate();
CREATE TRIGGER chatflows_truncated AFTER TRUNCATE ON chatflows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_identity_truncate();
CREATE TRIGGER grants_truncated AFTER TRUNCATE ON grants
    FOR EACH STATEMENT EXECUTE FUNCTION notify_identity_truncate();
