#!/usr/bin/env bash
# The whole benchmark in one command, on this machine:
#   1. builds the release proxy and the Flowise double (examples/flowise_double.rs:
#      the integration tests' test Flowise as a standalone server, answering
#      in the shapes of shared/flowise/);
#   2. creates a throwaway database on PostgreSQL (BENCH_PG, default
#      postgresql://postgres@127.0.0.1:5432/postgres), dropped at the end;
#   3. starts the double and the proxy on free loopback ports;
#   4. creates USERS (default 1000) users with bench/make-users.sh;
#   5. runs bench/predict.sh with the proxy's CPU time per request;
#   6. checks the books with `flowise-proxy ledger verify`.
#
#   bash bench/run.sh
#
# Environment: USERS, BENCH_PG, and predict.sh's DURATION, CONNECTIONS,
# THREADS, WARMUP, ONLY. Needs psql and curl; installs wrk when root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
USERS="${USERS:-1000}"
BENCH_PG="${BENCH_PG:-postgresql://postgres@127.0.0.1:5432/postgres}"
CHATFLOW="da1d5da2-3232-4684-8e21-7df065e96599" # the double's first chatflow
BIN="$ROOT/target/release/flowise-proxy"
DOUBLE="$ROOT/target/release/examples/flowise_double"

log() { echo "bench: $*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }

command -v psql >/dev/null || die "psql is needed (apt-get install -y postgresql-client)"
command -v curl >/dev/null || die "curl is needed"

bash scripts/dev-deps.sh
log "building (release)..."
cargo build --release --bin flowise-proxy --example flowise_double

WORK="$(mktemp -d -t fp-bench-XXXXXX)"
DB="fp_bench_$$"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    psql -q "$BENCH_PG" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

psql -q -v ON_ERROR_STOP=1 "$BENCH_PG" -c "CREATE DATABASE $DB" >/dev/null \
    || die "cannot create a database on $BENCH_PG"
DATABASE_URL="$(sed -E "s#/[^/?]*(\?.*)?\$#/$DB\1#" <<<"$BENCH_PG")"
export DATABASE_URL

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits up to 60 s for URL to answer 200.
wait_200() { # url
    for _ in $(seq 1 600); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "$1" || true)" = "200" ] && return 0
        sleep 0.1
    done
    return 1
}

"$DOUBLE" >"$WORK/flowise.url" 2>"$WORK/flowise.log" &
PIDS+=($!)
for _ in $(seq 1 100); do [ -s "$WORK/flowise.url" ] && break; sleep 0.1; done
FLOWISE_URL="$(head -n 1 "$WORK/flowise.url")"
[ -n "$FLOWISE_URL" ] || die "the Flowise double did not start: $(cat "$WORK/flowise.log")"
log "Flowise double on $FLOWISE_URL"

PORT="$(free_port)"
METRICS_PORT="$(free_port)"
cat >"$WORK/pingora.yaml" <<CONF
---
version: 1
threads: 2
pid_file: $WORK/proxy.pid
upgrade_sock: $WORK/upgrade.sock
CONF
HOST=127.0.0.1 PORT="$PORT" METRICS_ADDR="127.0.0.1:$METRICS_PORT" \
    FLOWISE_API_URL="$FLOWISE_URL" FLOWISE_API_KEY=test-flowise-key \
    JWT_SECRET_KEY="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
    LOGIN_ATTEMPTS_PER_MINUTE=1000000 LOG_FORMAT=json RUST_LOG=warn \
    "$BIN" serve -c "$WORK/pingora.yaml" >"$WORK/access.log" 2>"$WORK/proxy.log" &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
URL="http://127.0.0.1:$PORT"
wait_200 "$URL/health" || die "the proxy never became healthy: $(tail -n 20 "$WORK/proxy.log")"
log "proxy on $URL (pid $PROXY_PID)"

log "creating $USERS users..."
start=$(date +%s)
bash bench/make-users.sh "$URL" "$CHATFLOW" "$USERS" "$WORK/tokens.txt"
log "users ready in $(( $(date +%s) - start )) s"

PROXY_PID="$PROXY_PID" bash bench/predict.sh "$URL" "$CHATFLOW" "$WORK/tokens.txt"

# Let the last settlements land, then check the books.
for _ in $(seq 1 100); do
    held="$(psql -tAq "$DATABASE_URL" -c 'SELECT coalesce(sum(held), 0) FROM accounts')"
    [ "$held" = "0" ] && break
    sleep 0.1
done
"$BIN" ledger verify
psql -tAq "$DATABASE_URL" -c \
    "SELECT 'bench: ledger rows: ' || count(*) FILTER (WHERE kind = 'hold') || ' holds, ' ||
            count(*) FILTER (WHERE kind = 'capture') || ' captures' FROM ledger"
log "proxy RSS at the end: $(awk '/VmRSS/ {print $2, $3}' "/proc/$PROXY_PID/status")"
