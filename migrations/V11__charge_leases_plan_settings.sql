-- The settlement's lease-charge function carries its own planner settings
-- (issue 10: PostgreSQL CPU per debited request; found while profiling it).
--
-- Its statement reads the batch's rows with generate_series over two
-- variables, which the planner cannot size: it assumes 1000 rows, and
-- multiplies by it the cost of the replay guard's look-up in the ledger.
-- While the ledger has statistics that look-up is cheap, the estimate stays
-- far below `jit_above_cost` (100000 by default), and nothing happens. But
-- where the ledger has none (never analyzed: autovacuum off, as on the
-- machine these figures come from, or a large import not yet analyzed),
-- the estimate grows with the table's size on disk, crosses the threshold,
-- and PostgreSQL compiles the statement to machine code on every run: once
-- per lease per batch, ~12 ms each. Measured with bench/charge_leases.sql on
-- a ledger of 2.4 million rows without statistics: 2.0 s per batch of 100
-- leases, against 8.4-9.6 ms with JIT off (7.1-7.7 ms once analyzed, where
-- JIT stays off by itself). A statement that runs in microseconds never
-- gains from compiling, so the function turns JIT off for itself.
--
-- It also keeps the generic plan (index look-ups by user and id): its custom
-- plans are no better and cost ~100 us of planning per lease (the estimate
-- above keeps the generic plan from ever looking cheaper). The settlement
-- transaction used to say so itself (`SET LOCAL plan_cache_mode`), one more
-- statement per batch; now the function does, for whoever calls it.
ALTER FUNCTION charge_leases(bigint[], uuid[], int[], uuid[], bigint[], text[], text[], text[])
    SET jit = off
    SET plan_cache_mode = force_generic_plan;
