-- A lease's close rides in the settlement batch's one call (issue 10:
-- PostgreSQL CPU per debited request, and the burst of idle closes).
--
-- A lease that ran out (32 predictions' prices by default) or sat idle for
-- CREDIT_LEASE_IDLE_MS is closed by the settlement batch. Each close was a
-- statement of its own, pipelined beside the batch's charge_leases call:
-- ~700 of them per 6 s of 1000-user debits on the benchmark, and, 5 s after
-- such a run, 1000 idle closes in one batch that kept one PostgreSQL backend
-- busy for ~220 ms (on the 2-core benchmark machine, half of it, while the
-- proxy answered other requests).
--
-- This function is charge_leases (V9, V10, V11) with a close flag per group:
-- after a group's charges (if it has any), the same pass closes its lease if
-- asked, with the statement a close used to send on its own (unused credits
-- back to available, one 'release' ledger row, the lease's state settled).
-- Each statement still touches one user's rows and names its user_id (the
-- Citus rule), and groups still come sorted by user (the lock order). A
-- group with no rows charges nothing: no update of its lease's row. Returns,
-- per group, false where it had charges and found its lease no longer open
-- (nothing written for them).
--
-- charge_leases stays, for instances of the previous version still running
-- during a rolling upgrade, as a call of this function with no closes: one
-- implementation of the charge statement in the database, not two.
CREATE FUNCTION charge_and_close_leases(
    p_user bigint[], p_lease uuid[], p_end int[], p_close boolean[], p_release uuid[],
    p_id uuid[], p_amount bigint[], p_kind text[], p_rid text[], p_cf text[]
) RETURNS boolean[]
LANGUAGE plpgsql
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $$
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
        IF v_last >= v_first THEN
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
        ELSE
            v_open := 1;  -- nothing charged, nothing to report
        END IF;
        IF p_close[v_group] THEN
            WITH cur AS (
                SELECT hold_id, amount - COALESCE(captured, 0) - released AS r
                FROM holds
                WHERE holds.user_id = v_user AND holds.hold_id = v_lease
                  AND holds.state = 'open' AND holds.lease
                FOR UPDATE
            ), h AS (
                UPDATE holds SET released = released + cur.r,
                       state = CASE WHEN COALESCE(captured, 0) > 0 THEN 'captured'::hold_state
                                    ELSE 'voided'::hold_state END,
                       settled_at = now()
                FROM cur WHERE holds.user_id = v_user AND holds.hold_id = cur.hold_id
                RETURNING cur.r
            ), a AS (
                UPDATE accounts SET held = held - h.r, available = available + h.r,
                       updated_at = now()
                FROM h WHERE accounts.user_id = v_user AND h.r > 0
            )
            INSERT INTO ledger (user_id, kind, delta_available, delta_held, hold_id, lease_id)
            SELECT v_user, 'release'::ledger_kind, r, -r, p_release[v_group], v_lease
            FROM h WHERE r > 0;
        END IF;
        v_written := v_written || (v_open > 0);
        v_first := v_last + 1;
    END LOOP;
    RETURN v_written;
END
$$;

CREATE OR REPLACE FUNCTION charge_leases(
    p_user bigint[], p_lease uuid[], p_end int[],
    p_id uuid[], p_amount bigint[], p_kind text[], p_rid text[], p_cf text[]
) RETURNS boolean[]
LANGUAGE sql AS $$
    SELECT charge_and_close_leases(
        p_user, p_lease, p_end,
        array_fill(false, ARRAY[coalesce(array_length(p_user, 1), 0)]),
        array_fill(NULL::uuid, ARRAY[coalesce(array_length(p_user, 1), 0)]),
        p_id, p_amount, p_kind, p_rid, p_cf)
$$;
