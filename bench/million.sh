#!/usr/bin/env bash
# Identity at a million users (issue 10): start-up time, memory and
# change propagation of two proxy instances sharing one database.
#
#   bash bench/million.sh                 # builds the release proxy first
#   BIN=/path/to/flowise-proxy NO_BUILD=1 bash bench/million.sh   # another build
#
# It creates a throwaway database on BENCH_PG (default the local PostgreSQL;
# dropped at the end), migrates it with BIN, loads USERS (default 1000000)
# users, each with one API key and one grant, in SQL (generate_series, with
# the notification triggers off), starts the Flowise double and two proxy
# instances A and B one after the other, and reports:
#   - ready: seconds from spawn to the first GET /health 200, per instance;
#   - RSS (VmRSS) after start and after the changes, and the peak (VmHWM);
#   - propagation: REPS times each, a change committed on the database
#     (a grant; an API key revoked; a new API key), then the time until B
#     enforces it (polled over one keep-alive connection, every ms): a grant
#     until B answers 200 on the chatflow, a revocation until B answers 401;
#     a new key works on its first request anyway (a snapshot miss is looked
#     up), so for it the time until B's snapshot holds it (B's deltas
#     counter) is reported; median and max;
#   - database cost of one change: rows PostgreSQL returned or fetched for the
#     bench database (pg_stat_database tup_returned + tup_fetched, every
#     session, statistics flushed) over COST_CHANGES (default 50) grant
#     changes COST_PACE_S (0.1) s apart, minus an idle window of the same
#     length, per change; and the rows B says it read
#     (flowise_proxy_identity_snapshot_rows_read_total, new code only).
# The instances run with SNAPSHOT_RELOAD_INTERVAL_MS=$RELOAD_MS (default 600000)
# so that the old code's periodic full reload does not blur the per-change
# cost (its default, 5 s, would add a full read of every table every 5 s per
# instance).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BENCH_PG="${BENCH_PG:-postgresql://postgres@127.0.0.1:5432/postgres}"
USERS="${USERS:-1000000}"
REPS="${REPS:-7}"
RELOAD_MS="${RELOAD_MS:-600000}"
BIN="${BIN:-$ROOT/target/release/flowise-proxy}"
DOUBLE="${DOUBLE:-$ROOT/target/release/examples/flowise_double}"
FLOW_A="da1d5da2-3232-4684-8e21-7df065e96599"  # the double's chatflows
FLOW_B="3c214078-0d1c-49ec-8065-f75dbb219eb9"

log() { echo "million: [$(date -u +%H:%M:%S)] $*" >&2; }
die() { echo "million: $*" >&2; exit 1; }
command -v psql >/dev/null || die "psql is needed"
command -v python3 >/dev/null || die "python3 is needed"

if [ -z "${NO_BUILD:-}" ]; then
    log "building (release)..."
    cargo build --release --bin flowise-proxy --example flowise_double
fi
[ -x "$BIN" ] || die "$BIN not built"
[ -x "$DOUBLE" ] || die "$DOUBLE not built (cargo build --release --example flowise_double)"

WORK="$(mktemp -d -t fp-million-XXXXXX)"
DB="fp_million_$$"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    [ -z "${DOUBLE_PID:-}" ] || kill -TERM "$DOUBLE_PID" 2>/dev/null || true
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    psql -q "$BENCH_PG" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
    [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

psql -q -v ON_ERROR_STOP=1 "$BENCH_PG" -c "CREATE DATABASE $DB" >/dev/null \
    || die "cannot create a database on $BENCH_PG"
DATABASE_URL="$(sed -E "s#/[^/?]*(\?.*)?\$#/$DB\1#" <<<"$BENCH_PG")"
export DATABASE_URL
"$BIN" migrate >/dev/null 2>"$WORK/migrate.log" || die "migrate failed: $(cat "$WORK/migrate.log")"

log "loading $USERS users, keys and grants..."
LOAD_START=$(date +%s.%N)
# Key i: prefix = i in 12 hex digits, secret = "s<i>"; the token is
# fpk_<prefix>_s<i>. session_replication_role = replica: no triggers (no
# notification per row, no foreign-key checks) while loading.
psql -q -v ON_ERROR_STOP=1 "$DATABASE_URL" >/dev/null <<SQL
SET session_replication_role = replica;
INSERT INTO chatflows (id, name, deployed) VALUES
    ('$FLOW_A', 'peer-test-conversation', true), ('$FLOW_B', 'second-test-flow', true)
    ON CONFLICT DO NOTHING;
INSERT INTO users (id, username, password_hash, role)
    SELECT i, 'u' || i, 'not-a-hash', 'user' FROM generate_series(1, $USERS) i;
SELECT setval('users_id_seq', $USERS);
INSERT INTO accounts (user_id) SELECT i FROM generate_series(1, $USERS) i;
INSERT INTO api_keys (user_id, prefix, secret_hash)
    SELECT i, lpad(to_hex(i), 12, '0'), sha256(convert_to('s' || i, 'UTF8'))
    FROM generate_series(1, $USERS) i;
INSERT INTO grants (user_id, chatflow_id) SELECT i, '$FLOW_A' FROM generate_series(1, $USERS) i;
RESET session_replication_role;
ANALYZE;
SQL
LOAD_S=$(python3 -c "print(f'{$(date +%s.%N) - $LOAD_START:.1f}')")
log "loaded in ${LOAD_S} s"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

"$DOUBLE" >"$WORK/flowise.url" 2>"$WORK/flowise.log" &
DOUBLE_PID=$!
for _ in $(seq 1 100); do [ "$(grep -c . "$WORK/flowise.url" 2>/dev/null)" = 2 ] && break; sleep 0.1; done
FLOWISE_URL="$(sed -n 1p "$WORK/flowise.url")"
[ -n "$FLOWISE_URL" ] || die "the Flowise double did not start"

# start NAME: spawns an instance; prints "pid port metrics_port".
start() {
    local name="$1" port metrics
    port="$(free_port)"; metrics="$(free_port)"
    cat >"$WORK/$name.yaml" <<CONF
---
version: 1
threads: 2
CONF
    date +%s.%N >"$WORK/$name.t0"
    HOST=127.0.0.1 PORT="$port" METRICS_ADDR="127.0.0.1:$metrics" \
        FLOWISE_API_URL="$FLOWISE_URL" FLOWISE_API_KEY="test-flowise-key" \
        JWT_SECRET_KEY="million-bench-secret-0123456789abcdef" \
        SNAPSHOT_RELOAD_INTERVAL_MS="$RELOAD_MS" MIGRATE_ON_START=false \
        LOG_FORMAT=json RUST_LOG=info \
        "$BIN" serve -c "$WORK/$name.yaml" >/dev/null 2>"$WORK/$name.log" &
    echo "$! $port $metrics"
}


# The measurements are in Python (one keep-alive connection, ms polling, a
# persistent psql for the changes).
START_A="$(start A)"; read -r PID_A PORT_A MET_A <<<"$START_A"; PIDS+=("$PID_A")
python3 "$ROOT/bench/million.py" ready A "$PID_A" "$PORT_A" "$WORK/A.t0" >"$WORK/ready.A" \
    || die "instance A never became ready: $(tail -n 20 "$WORK/A.log")"
START_B="$(start B)"; read -r PID_B PORT_B MET_B <<<"$START_B"; PIDS+=("$PID_B")
python3 "$ROOT/bench/million.py" ready B "$PID_B" "$PORT_B" "$WORK/B.t0" >"$WORK/ready.B" \
    || die "instance B never became ready: $(tail -n 20 "$WORK/B.log")"
python3 "$ROOT/bench/million.py" changes "$DATABASE_URL" "$USERS" "$REPS" "$FLOW_B" \
    "$PID_A" "$PID_B" "$PORT_B" "$MET_B" "$DB" >"$WORK/changes"

COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo
echo "### identity at $USERS users: ${LABEL:-$BIN}"
echo
echo "binary: $BIN ($("$BIN" --version 2>/dev/null | head -n1 || true)); bench script at commit $COMMIT"
echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "data: $USERS users, $USERS API keys, $USERS grants, loaded in ${LOAD_S} s (SQL); SNAPSHOT_RELOAD_INTERVAL_MS=$RELOAD_MS"
echo
echo "| measure | value |"
echo "|---|---|"
cat "$WORK/ready.A" "$WORK/ready.B" "$WORK/changes"
