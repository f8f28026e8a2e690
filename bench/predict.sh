#!/usr/bin/env bash
# Load benchmark (not a test) of a running flowise-proxy with wrk.
#
#   bash bench/predict.sh PROXY_URL CHATFLOW_ID TOKENS_FILE
#
# Runs six measurements against PROXY_URL (e.g. http://127.0.0.1:8000):
#   anon          unauthenticated pass-through GET /api/v1/chatflows-streaming/ID
#   ping-many     authenticated pass-through GET /api/v1/ping, tokens rotating
#   ping-hot      the same, one user
#   chatflow      authenticated GET /api/v1/chatflows/CHATFLOW_ID (granted read)
#   predict-many  debited POST /api/v1/prediction/CHATFLOW_ID, tokens rotating
#                 over every user in TOKENS_FILE (1000 users recommended)
#   predict-hot   the same, one user (row-lock contention on one balance)
# and prints req/s, p50 and p99 for each. See bench/README.md for the setup.
#
# Tunables (environment): DURATION (default 20s), CONNECTIONS (64),
# THREADS (2), WARMUP (3s), ONLY (space list of the cases above), PROXY_PID
# (when set, also prints the proxy's CPU time per request and its RSS).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ $# -ne 3 ]; then
    sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
URL="${1%/}"
CHATFLOW="$2"
TOKENS="$3"
DURATION="${DURATION:-20s}"
CONNECTIONS="${CONNECTIONS:-64}"
THREADS="${THREADS:-2}"
WARMUP="${WARMUP:-3s}"
ONLY="${ONLY:-anon ping-many ping-hot chatflow predict-many predict-hot}"

[ -s "$TOKENS" ] || { echo "bench: token file $TOKENS is missing or empty" >&2; exit 2; }

if ! command -v wrk >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bench: installing wrk (apt-get)..." >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
    else
        echo "bench: wrk is missing; install the Debian package 'wrk' (sudo apt-get install -y wrk)" >&2
        exit 1
    fi
fi

# Fail early, with the status, when the first token does not work.
first="$(head -n 1 "$TOKENS" | tr -d '[:space:]')"
code="$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $first" "$URL/api/v1/ping" || true)"
if [ "$code" != "200" ]; then
    echo "bench: GET $URL/api/v1/ping with the first token answered $code (expected 200); is the proxy up, Flowise healthy, the token fresh?" >&2
    exit 1
fi
echo "bench: $(grep -c . "$TOKENS") tokens; $THREADS threads, $CONNECTIONS connections, $DURATION per case" >&2

# CPU time (user + system, in clock ticks) a process has used so far.
cpu_ticks() { # pid
    awk '{print $14 + $15}' "/proc/$1/stat"
}

run_case() { # name mode hot
    local name="$1" mode="$2" hot="$3"
    export BENCH_MODE="$mode" BENCH_TOKENS="$TOKENS" BENCH_HOT="$hot" BENCH_CHATFLOW="$CHATFLOW"
    wrk -t "$THREADS" -c "$CONNECTIONS" -d "$WARMUP" -s "$HERE/predict.lua" "$URL" >/dev/null
    local out result before=0 after=0 cpu=""
    if [ -n "${PROXY_PID:-}" ]; then before="$(cpu_ticks "$PROXY_PID")"; fi
    out="$(wrk -t "$THREADS" -c "$CONNECTIONS" -d "$DURATION" --latency -s "$HERE/predict.lua" "$URL")"
    if [ -n "${PROXY_PID:-}" ]; then after="$(cpu_ticks "$PROXY_PID")"; fi
    result="$(grep '^RESULT' <<<"$out" | head -n 1 | sed 's/^RESULT //')"
    if [ -n "${PROXY_PID:-}" ]; then
        # Proxy CPU per request, in microseconds (includes its background
        # work during the run: settlement batches, health checks).
        local requests
        requests="$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' <<<"$result")"
        cpu="$(awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v n="$requests" \
            'BEGIN { if (n > 0) printf " proxy_cpu_us_per_req=%.1f", t * 1e6 / hz / n }')"
        cpu="$cpu proxy_rss_mb=$(awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$PROXY_PID/status")"
    fi
    printf '%-13s %s%s\n' "$name" "$result" "$cpu"
}

for c in $ONLY; do
    case "$c" in
        anon) run_case anon anon 0 ;;
        ping-many) run_case ping-many ping 0 ;;
        ping-hot) run_case ping-hot ping 1 ;;
        chatflow) run_case chatflow chatflow 0 ;;
        predict-many) run_case predict-many predict 0 ;;
        predict-hot) run_case predict-hot predict 1 ;;
        *) echo "bench: unknown case $c" >&2; exit 2 ;;
    esac
done
echo "bench: non2xx counts 402 (out of credits) and 429 too; give users enough credits for the run." >&2
