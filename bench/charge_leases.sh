#!/usr/bin/env bash
# PostgreSQL's cost of one settlement batch's lease charges, alone: the
# `charge_and_close_leases` function (migration V12; `charge_leases`, V9-V11,
# with an older BENCH_BIN) called the way the settlement calls it, without
# the proxy, with pgbench.
#
#   bash bench/charge_leases.sh
#
# 1. creates a throwaway database on BENCH_PG (default
#    postgresql://postgres@127.0.0.1:5432/postgres) and migrates it with the
#    proxy's binary (BENCH_BIN, else target/release/flowise-proxy, built when
#    missing): so BENCH_BIN of an older commit measures that commit's schema;
# 2. gives USERS (1000) users an account and one open lease each;
# 3. fills the ledger with LEDGER_ROWS (default 2,400,000) old rows (voids:
#    they move nothing) and, unless ANALYZE=1, leaves it without statistics,
#    as it stays where autovacuum is off;
# 4. runs pgbench (one client, RUN_SECONDS (8) s): each transaction is one call
#    charging LEASES (100) leases of ROWS (1) predictions each, users taken
#    at random, in one transaction as the settlement's batch runs it (with
#    the batch's `SET LOCAL plan_cache_mode` before V11); prints its mean
#    latency, the backend's time per batch (the client is idle meanwhile);
# 5. drops the database.
#
# A benchmark, not a test: it prints a figure and checks nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BENCH_PG="${BENCH_PG:-postgresql://postgres@127.0.0.1:5432/postgres}"
USERS="${USERS:-1000}"
LEDGER_ROWS="${LEDGER_ROWS:-2400000}"
LEASES="${LEASES:-100}"
ROWS="${ROWS:-1}"
RUN_SECONDS="${RUN_SECONDS:-8}"
BIN="${BENCH_BIN:-target/release/flowise-proxy}"

command -v pgbench >/dev/null || { echo "charge_leases: pgbench is missing (Debian: postgresql-client)" >&2; exit 1; }
if [ -z "${BENCH_BIN:-}" ] && [ ! -x "$BIN" ]; then
    cargo build --release --quiet
fi

DB="fp_charge_$$"
DB_URL="${BENCH_PG%/*}/$DB"
psql -q "$BENCH_PG" -c "CREATE DATABASE $DB"
trap 'psql -q "$BENCH_PG" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true' EXIT
DATABASE_URL="$DB_URL" "$BIN" migrate >/dev/null
# The settlement's call: charge_and_close_leases from V12 (no closes here:
# the charges are what this measures), charge_leases before.
if [ -n "$(psql -tAq "$DB_URL" -c "SELECT 1 FROM pg_proc WHERE proname = 'charge_and_close_leases'")" ]; then
    FUNCTION=charge_and_close_leases
    CLOSE_ARGS="(SELECT array_agg(false) FROM grp), (SELECT array_agg(gen_random_uuid()) FROM grp),"
else
    FUNCTION=charge_leases
    CLOSE_ARGS=""
fi

psql -q -v ON_ERROR_STOP=1 "$DB_URL" <<SQL
INSERT INTO users (username, password_hash, role)
    SELECT 'bench' || g, 'x', 'user' FROM generate_series(1, $USERS) g;
INSERT INTO accounts (user_id, available, held) SELECT id, 0, 1000000000000 FROM users;
INSERT INTO holds (hold_id, request_id, user_id, amount, lease)
    SELECT gen_random_uuid(), 'lease', user_id, 1000000000000, true FROM accounts;
INSERT INTO ledger (user_id, kind, delta_available, delta_held, hold_id, lease_id)
    SELECT user_id, 'lease', 0, 1000000000000, hold_id, hold_id FROM holds;
INSERT INTO ledger (user_id, kind, delta_available, delta_held, hold_id, request_id, chatflow_id)
    SELECT (SELECT min(id) FROM users) + g % $USERS, 'void', 0, 0, gen_random_uuid(), 'old', 'old'
    FROM generate_series(1, $LEDGER_ROWS) g;
CREATE TABLE bench_leases AS SELECT user_id, hold_id AS lease_id FROM holds;
CREATE UNIQUE INDEX ON bench_leases (user_id);
-- One batch: g leases of consecutive users from a random one, r rows each.
CREATE FUNCTION bench_batch(g int, r int) RETURNS boolean[] LANGUAGE sql AS \$\$
  WITH s AS (SELECT (random() * ($USERS - g))::int AS first),
  grp AS (SELECT b.user_id, b.lease_id, i
          FROM s, generate_series(1, g) i, bench_leases b
          WHERE b.user_id = (SELECT min(id) FROM users) + s.first + i - 1)
  SELECT $FUNCTION(
    (SELECT array_agg(user_id ORDER BY i) FROM grp),
    (SELECT array_agg(lease_id ORDER BY i) FROM grp),
    (SELECT array_agg(i * r ORDER BY i) FROM grp),
    $CLOSE_ARGS
    (SELECT array_agg(gen_random_uuid()) FROM generate_series(1, g * r)),
    (SELECT array_agg(1::bigint) FROM generate_series(1, g * r)),
    (SELECT array_agg('charge'::text) FROM generate_series(1, g * r)),
    (SELECT array_agg('bench-request'::text) FROM generate_series(1, g * r)),
    (SELECT array_agg('bench-chatflow'::text) FROM generate_series(1, g * r)))
\$\$;
SQL
if [ "${ANALYZE:-0}" = 1 ]; then
    psql -q "$DB_URL" -c "ANALYZE"
fi
stats="without statistics"
[ "${ANALYZE:-0}" = 1 ] && stats="analyzed"
script="$(mktemp)"
# Before V11 the settlement chose the generic plan itself, in the batch's
# transaction; from V11 the function's own settings do.
if [ -z "$(psql -tAq "$DB_URL" -c "SELECT proconfig FROM pg_proc WHERE proname = '$FUNCTION'")" ]; then
    printf 'BEGIN;\nSET LOCAL plan_cache_mode = force_generic_plan;\nSELECT bench_batch(%s, %s);\nCOMMIT;\n' "$LEASES" "$ROWS" >"$script"
else
    printf 'BEGIN;\nSELECT bench_batch(%s, %s);\nCOMMIT;\n' "$LEASES" "$ROWS" >"$script"
fi
latency="$(pgbench -n -c1 -T "$RUN_SECONDS" -f "$script" "$DB_URL" 2>&1 | sed -n 's/^latency average = //p')"
rm -f "$script"
echo "$FUNCTION: $("$BIN" --version 2>/dev/null || echo "$BIN"); ledger of $LEDGER_ROWS rows, $stats; $LEASES leases x $ROWS rows per batch: $latency per batch"
