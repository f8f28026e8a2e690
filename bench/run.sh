#!/usr/bin/env bash
# The whole benchmark in one command, on this machine: flowise-proxy side by
# side with nginx and a bare Pingora proxy, all in front of the same Flowise
# double, in one run with interleaved repetitions.
#
#   1. builds the release proxy, the Flowise double (examples/flowise_double.rs:
#      the integration tests' test Flowise as a standalone server) and the bare
#      Pingora proxy (examples/bare_pingora.rs); installs nginx and wrk with
#      apt-get when missing (root);
#   2. creates a throwaway database on PostgreSQL (BENCH_PG, default
#      postgresql://postgres@127.0.0.1:5432/postgres), dropped at the end;
#   3. starts the double, flowise-proxy, the bare Pingora proxy and nginx
#      (configuration generated into a temporary directory) on free loopback
#      ports;
#   4. creates USERS (default 1000) users with bench/make-users.sh;
#   5. runs every scenario against every server with wrk, REPS times,
#      interleaved (the servers' order rotates per repetition), measuring the
#      CPU time of the server's processes and of PostgreSQL from /proc;
#   6. prints one markdown table (bench/table.py) with the machine and the
#      commit, and checks the books with `flowise-proxy ledger verify`.
#
#   bash bench/run.sh
#
# Scenarios (ONLY selects some; all by default):
#   ping          authenticated pass-through GET /api/v1/ping, 1000 users
#   chatflow      authenticated GET /api/v1/chatflows/{id}
#   predict-many  debited JSON prediction, tokens over every user
#   predict-hot   the same, one user (nginx and bare: predict-many is their
#                 reference, they debit nothing)
#   burst         streaming prediction answered with BURST_EVENTS (50) events
#                 at once
#   spaced        streaming prediction with SPACED_EVENTS (20) events
#                 SPACED_GAP_US (5000) µs apart
#
# Then, open loop (examples/open_loop.rs, which corrects for coordinated
# omission as wrk2 does; wrk2 is not packaged for Debian): authenticated
# GET /api/v1/ping at a fixed rate, a quarter of nginx's median ping rate
# above (or OPEN_LOOP_RATE), against every server and directly against the
# double, OPEN_LOOP_REPS (2) × OPEN_LOOP_SECONDS (6) interleaved, over at most
# CONNECTIONS connections as wrk2 would: the p99 each server adds over going
# direct.
#
# Environment: BENCH_BIN (a flowise-proxy binary to measure instead of this
# tree's, not built), USERS (1000), BENCH_PG, REPS (3), DURATION (6s per run),
# WARMUP (1s before each run), CONNECTIONS (64), THREADS (2), ONLY, SERVERS
# ("nginx bare proxy"), KEEP (non-empty: leave the database and the work
# directory, with the servers' logs, for inspection), HOLD (seconds: set up,
# write the servers' URLs and pids to /tmp/fp-bench-servers.env, wait that
# long instead of measuring; for profilers), RESULTS (file for the raw per-run lines; default a
# temporary file, shown at the end). Needs psql, curl, python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
USERS="${USERS:-1000}"
BENCH_PG="${BENCH_PG:-postgresql://postgres@127.0.0.1:5432/postgres}"
REPS="${REPS:-3}"
DURATION="${DURATION:-6s}"
OPEN_LOOP_REPS="${OPEN_LOOP_REPS:-2}"
OPEN_LOOP_SECONDS="${OPEN_LOOP_SECONDS:-6}"
WARMUP="${WARMUP:-1s}"
CONNECTIONS="${CONNECTIONS:-64}"
THREADS="${THREADS:-2}"
ONLY="${ONLY:-ping chatflow predict-many predict-hot burst spaced}"
SERVERS="${SERVERS:-nginx bare proxy}"
BURST_EVENTS="${BURST_EVENTS:-50}"
SPACED_EVENTS="${SPACED_EVENTS:-20}"
SPACED_GAP_US="${SPACED_GAP_US:-5000}"
CHATFLOW="da1d5da2-3232-4684-8e21-7df065e96599" # the double's first chatflow
FLOWISE_KEY="test-flowise-key"                  # the double's API key
# BENCH_BIN: a flowise-proxy binary built elsewhere (e.g. a saved build of
# another commit) to measure instead of this tree's; then it is not built.
BIN="${BENCH_BIN:-$ROOT/target/release/flowise-proxy}"
DOUBLE="$ROOT/target/release/examples/flowise_double"
BARE="$ROOT/target/release/examples/bare_pingora"
OPEN_LOOP="$ROOT/target/release/examples/open_loop"

log() { echo "bench: [$(date -u +%H:%M:%S)] $*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }

command -v psql >/dev/null || die "psql is needed (apt-get install -y postgresql-client)"
command -v curl >/dev/null || die "curl is needed"
command -v python3 >/dev/null || die "python3 is needed"

# Debian packages, installed when missing (root only). The image's
# /usr/sbin/policy-rc.d (or its absence) decides whether apt starts the
# system nginx; this script never uses it, it starts its own.
apt_install() { # command package
    command -v "$1" >/dev/null 2>&1 && return 0
    [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 \
        || die "$1 is missing; install the Debian package '$2'"
    log "installing $2 (apt-get)..."
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}
apt_install wrk wrk
case " $SERVERS " in *" nginx "*) apt_install nginx nginx ;; esac
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

bash scripts/dev-deps.sh
log "building (release)..."
if [ -n "${BENCH_BIN:-}" ]; then
    cargo build --release --example flowise_double --example bare_pingora --example open_loop
else
    cargo build --release --bin flowise-proxy --example flowise_double --example bare_pingora \
        --example open_loop
fi

WORK="$(mktemp -d -t fp-bench-XXXXXX)"
RESULTS="${RESULTS:-$WORK/results.tsv}"
: >"$RESULTS"
DB="fp_bench_$$"
PIDS=()
# Alive and not a zombie (an exited child stays a zombie until waited for).
running() {
    [ -r "/proc/$1/stat" ] && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]
}
cleanup() {
    # SIGINT: Pingora exits at once (SIGTERM waits out its grace period) and
    # nginx shuts down fast; the double has no handler of its own, and a
    # background job of a script ignores SIGINT, so it gets SIGTERM.
    for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    [ -z "${DOUBLE_PID:-}" ] || kill -TERM "$DOUBLE_PID" 2>/dev/null || true
    # A server still running 10 s later is killed: a leftover takes CPU from
    # whatever runs next on this machine (seen once: the bare Pingora of a
    # finished run spinning on a whole core for minutes).
    local _ p left
    for _ in $(seq 1 100); do
        left=""
        for p in "${PIDS[@]}"; do running "$p" && left="$left $p"; done
        [ -z "$left" ] && break
        sleep 0.1
    done
    for p in $left; do
        log "pid $p still running after 10 s: killed"
        kill -KILL "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ -n "${KEEP:-}" ]; then
        log "KEEP: database $DB and $WORK left for inspection"
        return
    fi
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

# Waits up to 60 s for URL to answer STATUS (default 200).
wait_status() { # url [status] [curl args...]
    local url="$1" want="${2:-200}"
    shift 2 || shift $#
    for _ in $(seq 1 600); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "$@" "$url" || true)" = "$want" ] && return 0
        sleep 0.1
    done
    return 1
}

# --- the Flowise double ----------------------------------------------------
"$DOUBLE" >"$WORK/flowise.url" 2>"$WORK/flowise.log" &
DOUBLE_PID=$!
PIDS+=("$DOUBLE_PID")
for _ in $(seq 1 100); do [ "$(grep -c . "$WORK/flowise.url" 2>/dev/null)" = 2 ] && break; sleep 0.1; done
FLOWISE_URL="$(sed -n 1p "$WORK/flowise.url")"
CONTROL_URL="$(sed -n 2p "$WORK/flowise.url")"
[ -n "$FLOWISE_URL" ] && [ -n "$CONTROL_URL" ] \
    || die "the Flowise double did not start: $(cat "$WORK/flowise.log")"
FLOWISE_HOSTPORT="${FLOWISE_URL#http://}"
log "Flowise double on $FLOWISE_URL (control $CONTROL_URL)"
set_event_gap() { # microseconds between streamed events
    curl -sf -o /dev/null -X PUT "$CONTROL_URL/token-delay-us/$1" || die "cannot set the double's event gap"
}

# --- flowise-proxy -----------------------------------------------------------
PORT="$(free_port)"
METRICS_PORT="$(free_port)"
cat >"$WORK/pingora.yaml" <<CONF
---
version: 1
threads: 2
work_stealing: false
pid_file: $WORK/proxy.pid
upgrade_sock: $WORK/upgrade.sock
CONF
HOST=127.0.0.1 PORT="$PORT" METRICS_ADDR="127.0.0.1:$METRICS_PORT" \
    FLOWISE_API_URL="$FLOWISE_URL" FLOWISE_API_KEY="$FLOWISE_KEY" \
    JWT_SECRET_KEY="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
    LOGIN_ATTEMPTS_PER_MINUTE=1000000 LOG_FORMAT=json RUST_LOG=warn \
    "$BIN" serve -c "$WORK/pingora.yaml" >"$WORK/access.log" 2>"$WORK/proxy.log" &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
PROXY_URL="http://127.0.0.1:$PORT"
wait_status "$PROXY_URL/health" 200 || die "the proxy never became healthy: $(tail -n 20 "$WORK/proxy.log")"
log "flowise-proxy on $PROXY_URL (pid $PROXY_PID)"

# --- bare Pingora --------------------------------------------------------------
BARE_PORT="$(free_port)"
BARE_LISTEN="127.0.0.1:$BARE_PORT" BARE_UPSTREAM="$FLOWISE_HOSTPORT" \
    BARE_UPSTREAM_KEY="$FLOWISE_KEY" BARE_THREADS=2 BARE_WORK_STEALING=false \
    "$BARE" >/dev/null 2>"$WORK/bare.log" &
BARE_PID=$!
PIDS+=("$BARE_PID")
BARE_URL="http://127.0.0.1:$BARE_PORT"
wait_status "$BARE_URL/api/v1/ping" 200 -H "Authorization: Bearer x" \
    || die "the bare Pingora proxy did not start: $(tail -n 20 "$WORK/bare.log")"
log "bare Pingora on $BARE_URL (pid $BARE_PID)"

# --- nginx ---------------------------------------------------------------------
NGINX_URL=""
NGINX_PID=""
if [ -x "$NGINX" ]; then
    NGINX_PORT="$(free_port)"
    mkdir -p "$WORK/nginx"
    # A minimal gateway: 2 workers, keep-alive to the upstream, a bearer
    # header required, the upstream key sent instead, no buffering (event
    # streams go through as they come), one access log line per request (the
    # proxy writes one too).
    cat >"$WORK/nginx/nginx.conf" <<CONF
worker_processes 2;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log $WORK/nginx/access.log;
    client_body_temp_path $WORK/nginx/client_body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    upstream flowise {
        server $FLOWISE_HOSTPORT;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            if (\$http_authorization !~ "^Bearer ") { return 401; }
            proxy_pass http://flowise;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer $FLOWISE_KEY";
            proxy_buffering off;
        }
    }
}
CONF
    "$NGINX" -e "$WORK/nginx/error.log" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" \
        >/dev/null 2>>"$WORK/nginx/error.log" &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
    NGINX_URL="http://127.0.0.1:$NGINX_PORT"
    wait_status "$NGINX_URL/api/v1/ping" 200 -H "Authorization: Bearer x" \
        || die "nginx did not start: $(tail -n 20 "$WORK/nginx/error.log")"
    log "nginx $("$NGINX" -v 2>&1 | sed 's#.*/##') on $NGINX_URL (master pid $NGINX_PID)"
fi

# --- users -----------------------------------------------------------------------
log "creating $USERS users..."
start=$(date +%s)
# The binary under test creates the admin (and so migrates the database to
# its own schema), not the tree's build.
BIN="$BIN" bash bench/make-users.sh "$PROXY_URL" "$CHATFLOW" "$USERS" "$WORK/tokens.txt"
log "users ready in $(( $(date +%s) - start )) s"

# --- measuring -------------------------------------------------------------------
# CPU time (clock ticks) of a set of processes so far.
ticks_of() { # pid...
    local total=0 p t
    for p in "$@"; do
        # Fields after the command name; utime and stime are fields 14 and 15.
        t="$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}')" || t=0
        total=$((total + ${t:-0}))
    done
    echo "$total"
}
# nginx: the master and its workers.
server_pids() { # server
    case "$1" in
        nginx) echo "$NGINX_PID $(pgrep -P "$NGINX_PID" | tr '\n' ' ')" ;;
        bare) echo "$BARE_PID" ;;
        proxy) echo "$PROXY_PID" ;;
        direct) echo "$DOUBLE_PID" ;;
    esac
}
# PostgreSQL: the backends serving the benchmark's database (the proxy's
# pool; parallel and autovacuum workers on it too). The cluster's shared
# processes (WAL writer, checkpointer, background writer) are left out: on a
# shared machine they mostly work for other databases, and the backend
# flushes its own commit's WAL.
pg_ticks() {
    local total=0 p cmd stat
    for p in $(grep -lx postgres /proc/[0-9]*/comm 2>/dev/null | cut -d/ -f3); do
        # A backend's title is "postgres: CLUSTER: USER DATABASE HOST(PORT) STATE".
        cmd="$(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline")" 2>/dev/null || continue
        case "$cmd" in *" $DB "*) ;; *) continue ;; esac
        stat="$(cat "/proc/$p/stat" 2>/dev/null)" || continue
        total=$((total + $(awk '{print $12 + $13}' <<<"${stat##*) }")))
    done
    echo "$total"
}
server_url() {
    case "$1" in
        nginx) echo "$NGINX_URL" ;; bare) echo "$BARE_URL" ;; proxy) echo "$PROXY_URL" ;;
        direct) echo "$FLOWISE_URL" ;;
    esac
}

# scenario -> "wrk mode, hot, events, event gap µs"
scenario_args() {
    case "$1" in
        ping) echo "ping 0 0 0" ;;
        chatflow) echo "chatflow 0 0 0" ;;
        predict-many) echo "predict 0 0 0" ;;
        predict-hot) echo "predict 1 0 0" ;;
        burst) echo "stream 0 $BURST_EVENTS 0" ;;
        spaced) echo "stream 0 $SPACED_EVENTS $SPACED_GAP_US" ;;
        *) die "unknown scenario $1" ;;
    esac
}

# Waits (at most 60 s) until every debit is settled: the proxy's settlement
# queue is empty and no exact hold is open (leases stay open while in use, and
# close after CREDIT_LEASE_IDLE_MS). Prints how long that took, in ms.
settled() {
    local queued open start=$(date +%s%N)
    for _ in $(seq 1 600); do
        queued="$(curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" |
            awk '$1 == "flowise_proxy_settlement_queue_depth" { print $2 }')"
        open="$(psql -tAq "$DATABASE_URL" -c "SELECT count(*) FROM holds WHERE state = 'open' AND NOT lease")"
        [ "$queued" = "0" ] && [ "$open" = "0" ] && break
        sleep 0.05
    done
    [ "$queued" = "0" ] && [ "$open" = "0" ] || log "not settled after 60 s: queue $queued, open holds $open"
    echo $(( ($(date +%s%N) - start) / 1000000 ))
}

measure() { # rep scenario server
    local rep="$1" scenario="$2" server="$3" url mode hot events gap pids
    url="$(server_url "$server")"
    pids="$(server_pids "$server")"
    local s0 p0 s1 p1 out result settle_ms=""
    if [ "$scenario" = open-loop ]; then
        # shellcheck disable=SC2086
        s0="$(ticks_of $pids)"
        p0="$(pg_ticks)"
        out="$("$OPEN_LOOP" "$url" /api/v1/ping "$OPEN_LOOP_RATE" "$OPEN_LOOP_SECONDS" "$WORK/tokens.txt" "$CONNECTIONS")"
    else
        read -r mode hot events gap <<<"$(scenario_args "$scenario")"
        export BENCH_MODE="$mode" BENCH_HOT="$hot" BENCH_EVENTS="$events" \
            BENCH_TOKENS="$WORK/tokens.txt" BENCH_CHATFLOW="$CHATFLOW"
        wrk -t "$THREADS" -c "$CONNECTIONS" -d "$WARMUP" -s bench/predict.lua "$url" >/dev/null
        # shellcheck disable=SC2086
        s0="$(ticks_of $pids)"
        p0="$(pg_ticks)"
        out="$(wrk -t "$THREADS" -c "$CONNECTIONS" -d "$DURATION" --latency -s bench/predict.lua "$url")"
        # The proxy settles debits in batches, behind the requests: let its
        # backlog drain before the CPU is read, so that the settlement's cost
        # (in the proxy and in PostgreSQL) is in this row and not in the next.
        if [ "$server" = proxy ] && [ "$mode" != ping ] && [ "$mode" != chatflow ]; then
            settle_ms="$(settled)"
        fi
    fi
    # shellcheck disable=SC2086
    s1="$(ticks_of $pids)"
    p1="$(pg_ticks)"
    result="$(grep '^RESULT' <<<"$out" | head -n 1 | sed 's/^RESULT //')"
    [ -n "$result" ] || die "no result for $scenario on $server: $out"
    printf 'rep=%s scenario=%s server=%s %s server_ticks=%s pg_ticks=%s hz=%s%s\n' \
        "$rep" "$scenario" "$server" "$result" $((s1 - s0)) $((p1 - p0)) "$(getconf CLK_TCK)" \
        "${settle_ms:+ settle_ms=$settle_ms}" | tee -a "$RESULTS" >&2
}

# Every server must answer every scenario's request before we time it.
first_token="$(head -n 1 "$WORK/tokens.txt")"
for server in $SERVERS; do
    url="$(server_url "$server")"
    [ -n "$url" ] || die "server $server is not running"
    code="$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $first_token" "$url/api/v1/chatflows/$CHATFLOW")"
    [ "$code" = 200 ] || die "$server answered $code to GET /api/v1/chatflows/$CHATFLOW"
done

# HOLD: everything is set up; write what a profiler needs and wait (until
# Ctrl-C or HOLD seconds) instead of measuring.
if [ -n "${HOLD:-}" ]; then
    cat >"$WORK/servers.env" <<ENV
NGINX_URL=$NGINX_URL
BARE_URL=$BARE_URL
PROXY_URL=$PROXY_URL
FLOWISE_URL=$FLOWISE_URL
CONTROL_URL=$CONTROL_URL
METRICS_URL=http://127.0.0.1:$METRICS_PORT/metrics
NGINX_PID=$NGINX_PID
BARE_PID=$BARE_PID
PROXY_PID=$PROXY_PID
DOUBLE_PID=$DOUBLE_PID
DATABASE_URL=$DATABASE_URL
BENCH_TOKENS=$WORK/tokens.txt
BENCH_CHATFLOW=$CHATFLOW
ENV
    cp "$WORK/servers.env" "${TMPDIR:-/tmp}/fp-bench-servers.env"
    log "HOLD: servers up, see ${TMPDIR:-/tmp}/fp-bench-servers.env; waiting ${HOLD} s"
    sleep "$HOLD"
    exit 0
fi

# Servers of an earlier run still alive take CPU from this one: say so.
for p in $(pgrep -f 'examples/(bare_pingora|flowise_double)|flowise-proxy serve' || true); do
    case " ${PIDS[*]} " in *" $p "*) continue ;; esac
    log "warning: pid $p ($(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-80)) is not this run's: it may skew the figures"
done
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
log "$REPS × $DURATION per scenario and server, $THREADS wrk threads, $CONNECTIONS connections"
servers=($SERVERS)
for rep in $(seq 1 "$REPS"); do
    # Rotate the servers' order so that none always runs first or last.
    order=()
    for i in "${!servers[@]}"; do
        order+=("${servers[$(((i + rep - 1) % ${#servers[@]}))]}")
    done
    for scenario in $ONLY; do
        read -r _ _ _ gap <<<"$(scenario_args "$scenario")"
        set_event_gap "$gap"
        for server in "${order[@]}"; do
            # nginx and bare debit nothing: predict-many is their reference.
            if [ "$scenario" = predict-hot ] && [ "$server" != proxy ]; then continue; fi
            measure "$rep" "$scenario" "$server"
        done
    done
done
set_event_gap 0

# --- open loop: added latency at a fixed rate -----------------------------------
# A quarter of nginx's peak pass-through rate (median of its ping runs above),
# the same for every server and for going direct to the double.
if [ "$OPEN_LOOP_REPS" -gt 0 ]; then
    peak="$(awk '/scenario=ping server=nginx/ { for (i = 1; i <= NF; i++) if ($i ~ /^req_per_s=/) { sub(/req_per_s=/, "", $i); print $i } }' "$RESULTS" | sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }')"
    OPEN_LOOP_RATE="${OPEN_LOOP_RATE:-$(( ${peak:-4000} / 4 ))}"
    log "open loop: GET /api/v1/ping at $OPEN_LOOP_RATE req/s, $OPEN_LOOP_REPS × ${OPEN_LOOP_SECONDS} s per server"
    ol_servers=(direct "${servers[@]}")
    for rep in $(seq 1 "$OPEN_LOOP_REPS"); do
        for i in "${!ol_servers[@]}"; do
            measure "$rep" open-loop "${ol_servers[$(((i + rep - 1) % ${#ol_servers[@]}))]}"
        done
    done
fi

# --- the books and the table -------------------------------------------------------
settled >/dev/null
LEDGER="$("$BIN" ledger verify 2>&1 | tail -n 1)"
log "ledger verify: $LEDGER"
log "proxy RSS at the end: $(awk '/VmRSS/ {print $2, $3}' "/proc/$PROXY_PID/status")"

COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT (+ uncommitted changes)"
[ -z "${BENCH_BIN:-}" ] || COMMIT="$COMMIT, proxy binary $BENCH_BIN"
python3 bench/table.py "$RESULTS" \
    --machine "$(nproc) vCPU, $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), Linux $(uname -r); load average before $LOAD_BEFORE, after $(cut -d' ' -f1-3 /proc/loadavg)" \
    --commit "$COMMIT" \
    --setup "wrk -t$THREADS -c$CONNECTIONS, $REPS × $DURATION interleaved per scenario and server; $USERS users; burst = $BURST_EVENTS events at once; spaced = $SPACED_EVENTS events ${SPACED_GAP_US} µs apart; nginx $("$NGINX" -v 2>&1 | sed 's#.*/##'); ledger verify: $LEDGER"
if [ "$RESULTS" = "$WORK/results.tsv" ]; then
    cp "$RESULTS" "${TMPDIR:-/tmp}/fp-bench-last-results.txt"
    log "raw lines: ${TMPDIR:-/tmp}/fp-bench-last-results.txt"
fi
