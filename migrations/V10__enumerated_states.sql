-- Hold states and ledger kinds as enumerated types instead of text with a
-- CHECK (issue 10: PostgreSQL CPU per debited request).
--
-- Profiled under load (perf record on the backends, 1000 users' debited
-- predictions): 22 % of the backends' CPU was ExecConstraints, and two
-- thirds of that was reading the CHECK expressions back from their stored
-- text (stringToNode) and planning them, once per statement: PostgreSQL
-- rebuilds a table's CHECK expressions for every statement that writes it,
-- and a settlement batch runs one statement per lease (see V9). An `IN`
-- list is stored as an array constant written out byte by byte, so the two
-- checks on a state and a kind were more than half of all the text read.
-- An enumerated type makes the same promise (no other value can be
-- stored) in the type's input function, at no per-statement cost.
-- Measured on a copy of the benchmark's database: 69 -> 57 us of
-- PostgreSQL CPU per debited prediction without those checks.
--
-- The numeric checks (no negative balance, never more captured and
-- released than held) stay as they are: they are what makes overspending
-- impossible. The client binds kinds and states as text and casts them
-- (`$n::text::ledger_kind`); results read `kind::text`.

CREATE TYPE hold_state AS ENUM ('open', 'captured', 'voided', 'expired');
CREATE TYPE ledger_kind AS ENUM
    ('hold', 'capture', 'void', 'expire', 'grant', 'adjust', 'lease', 'charge', 'release');

-- The partial indexes name `state = 'open'` as text: rebuilt on the enum.
DROP INDEX holds_open_renewed;
DROP INDEX holds_open_leases;
ALTER TABLE holds DROP CONSTRAINT holds_state_check;
ALTER TABLE holds
    ALTER COLUMN state DROP DEFAULT,
    ALTER COLUMN state TYPE hold_state USING state::hold_state,
    ALTER COLUMN state SET DEFAULT 'open';
CREATE INDEX holds_open_renewed ON holds (renewed_at) WHERE state = 'open';
CREATE INDEX holds_open_leases ON holds (user_id) WHERE state = 'open' AND lease;

ALTER TABLE ledger DROP CONSTRAINT ledger_kind_check;
ALTER TABLE ledger ALTER COLUMN kind TYPE ledger_kind USING kind::ledger_kind;

-- V9's function, with the kinds it is given (text) cast to the enum.
CREATE OR REPLACE FUNCTION charge_leases(
    p_user bigint[], p_lease uuid[], p_end int[],
    p_id uuid[], p_amount bigint[], p_kind text[], p_rid text[], p_cf text[]
) RETURNS boolean[]
LANGUAGE plpgsql AS $$
DECLARE
    v_group int;
    v_first int := 1;
    v_last int;
    v_user bigint;
    v_lease uuid;
    v_open bigint;
    v_written boolean[] := '{}';
BEGIN
    FOR v_group IN 1 .. coalesce(array_length(p_user, 1), 0) LOOP
        v_user := p_user[v_group];
        v_lease := p_lease[v_group];
        v_last := p_end[v_group];
        WITH x AS (
            SELECT * FROM (
                SELECT p_id[i] AS id, p_amount[i] AS amount, p_kind[i]::ledger_kind AS kind,
                       p_rid[i] AS rid, p_cf[i] AS cf
                FROM generate_series(v_first, v_last) AS i
            ) AS x
            WHERE NOT EXISTS (SELECT 1 FROM ledger
                              WHERE ledger.hold_id = x.id AND ledger.kind = x.kind
                                AND ledger.user_id = v_user
                              OFFSET 0)
        ), t AS (
            SELECT COALESCE(sum(amount), 0)::bigint AS total FROM x
        ), h AS (
            UPDATE holds SET captured = COALESCE(captured, 0) + t.total
            FROM t WHERE holds.user_id = v_user AND holds.hold_id = v_lease
                     AND holds.state = 'open' AND holds.lease
            RETURNING holds.user_id, t.total
        ), a AS (
            UPDATE accounts SET held = held - h.total, updated_at = now()
            FROM h WHERE accounts.user_id = v_user AND h.total > 0
        ), l AS (
            INSERT INTO ledger (user_id, kind, delta_available, delta_held, hold_id,
                                request_id, chatflow_id, lease_id)
            SELECT v_user, x.kind, 0, -x.amount, x.id, x.rid, x.cf, v_lease FROM x, h
        )
        SELECT count(*) INTO v_open FROM h;
        v_written := v_written || (v_open > 0);
        v_first := v_last + 1;
    END LOOP;
    RETURN v_written;
END
$$;
