-- A settlement batch's lease charges in one call (issue 10: PostgreSQL CPU
-- per debited request).
--
-- The batch wrote one statement per lease (one per user with predictions
-- since the last batch: about 1.4 rows each at 1000 users), pipelined, each
-- with its own Bind, Execute and Sync, so PostgreSQL answered and flushed
-- every one of them separately. pgbench on this machine, 64 such
-- per-user statements in one transaction, backend CPU per statement: 149 us
-- one by one, 65 us pipelined behind one Sync, 56 us as a loop in one
-- PL/pgSQL call. This function is that loop.
--
-- Nothing changes in what a charge does: each pass of the loop is the
-- statement the batch used to send (it touches one user's rows and names
-- its user_id, so the credit tables can still be distributed by user_id:
-- on Citus the function runs on the coordinator and each of its statements
-- is routed to that user's shard). Groups come sorted by user (the
-- caller's lock order); the rows of group g are p_end[g-1]+1 .. p_end[g]
-- of the row arrays. Returns, per group, whether its lease was open (false:
-- nothing written for it).
--
-- Rows are read by subscript, not by slicing the arrays: PL/pgSQL keeps
-- array arguments deconstructed, where an element costs the same whatever
-- the array's length, but a slice flattens the whole array again (a batch
-- of n leases would cost n copies of every array).
--
-- The replay guard's `OFFSET 0` keeps it a per-row look-up on
-- ledger_hold_kind (hold_id, kind): without it the generic plan turned it
-- into an anti join over every ledger row of the user.
CREATE FUNCTION charge_leases(
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
                SELECT p_id[i] AS id, p_amount[i] AS amount, p_kind[i] AS kind,
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
