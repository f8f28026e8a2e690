-- No foreign-key check per row on the append-only tables (issue 10:
-- PostgreSQL CPU per debited request).
--
-- A profile of PostgreSQL during 1000-user debits (perf, every backend)
-- put 12 % of its CPU in these checks: each ledger and sessions row ran a
-- query that locks the parent row FOR KEY SHARE (for sessions, a lock
-- written into the users row), one per prediction for each table. After
-- this migration the same profile shows 0.3 %; pgbench, 20 single-row
-- inserts per transaction: 336-367 tx/s with the key, 389-466 without.
--
-- Nothing relied on them: every writer takes user_id from the parent row
-- in the same statement (the account or the lease it updates) or from the
-- authenticated user, and users and accounts are never deleted (there is no
-- DELETE on either, and accounts keeps ON DELETE RESTRICT towards users).
-- `ledger verify` reports a ledger row whose user has no account. holds
-- keeps its key: one row per lease, not per request.
ALTER TABLE ledger DROP CONSTRAINT ledger_user_id_fkey;
ALTER TABLE sessions DROP CONSTRAINT sessions_user_id_fkey;
