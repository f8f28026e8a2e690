#!/usr/bin/env bash
# Creates N benchmark users through the admin API, grants them CHATFLOW_ID,
# tops them up, logs each in via /chat/authenticate and writes the access
# tokens, one per line, to OUT (default bench/tokens.txt).
#
#   DATABASE_URL=... bash bench/make-users.sh PROXY_URL CHATFLOW_ID [N] [OUT]
#
# The admin `benchadmin` is created with the CLI (DATABASE_URL: the proxy's
# database) when missing. Users are bench0001..benchNNNN; existing ones are
# reused and topped up again. CREDITS (default 1000000) per user, PARALLEL
# (4) requests at a time. Logins count against the proxy's login throttle:
# run the proxy with LOGIN_ATTEMPTS_PER_MINUTE above N.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ $# -ge 2 ] || { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
export URL="${1%/}" CHATFLOW="$2"
N="${3:-1000}"; OUT="${4:-bench/tokens.txt}"
export CREDITS="${CREDITS:-1000000}" RUN_ID="$(date +%s%N)"
export PASSWORD="${BENCH_PASSWORD:-bench-password-not-secret}"
PARALLEL="${PARALLEL:-4}"
BIN="${BIN:-target/release/flowise-proxy}"
[ -x "$BIN" ] || { echo "bench: $BIN not built (cargo build --release)" >&2; exit 1; }
[ -n "${DATABASE_URL:-}" ] || { echo "bench: set DATABASE_URL (the proxy's database)" >&2; exit 1; }

# Prints the value of a top-level JSON field (string or number) read on stdin.
json_field() {
    sed -n "s/.*\"$1\":\"\{0,1\}\([^\",}]*\).*/\1/p" | head -n 1
}
export -f json_field

login() { # name -> the JSON answer
    curl -sf "$URL/chat/authenticate" -H 'content-type: application/json' \
        -d "{\"username\":\"$1\",\"password\":\"$PASSWORD\"}"
}
export -f login

if ! "$BIN" user list | cut -f2 | grep -qx benchadmin; then
    printf '%s\n' "$PASSWORD" | "$BIN" user add benchadmin --role admin >/dev/null
fi
ADMIN_TOKEN="$(login benchadmin | json_field access_token)"
[ -n "$ADMIN_TOKEN" ] || { echo "bench: benchadmin cannot log in at $URL" >&2; exit 1; }
export ADMIN_TOKEN

# One user: create (409 when it exists), log in, grant, top up. Prints
# "INDEX TOKEN".
one_user() { # index
    local name body token id
    name="$(printf 'bench%04d' "$1")"
    curl -s -o /dev/null "$URL/admin/users" -H "authorization: Bearer $ADMIN_TOKEN" \
        -H 'content-type: application/json' \
        -d "{\"username\":\"$name\",\"password\":\"$PASSWORD\",\"role\":\"user\"}"
    body="$(login "$name")" || { echo "bench: login failed for $name" >&2; return 1; }
    token="$(json_field access_token <<<"$body")"
    id="$(sed -n 's/.*"user":{[^}]*"id":\([0-9]*\).*/\1/p' <<<"$body")"
    [ -n "$token" ] && [ -n "$id" ] || { echo "bench: no token or id for $name: $body" >&2; return 1; }
    curl -sf -o /dev/null "$URL/admin/chatflows/$CHATFLOW/users" -H "authorization: Bearer $ADMIN_TOKEN" \
        -H 'content-type: application/json' -d "{\"user_id\":$id}" \
        || { echo "bench: grant failed for $name" >&2; return 1; }
    curl -sf -o /dev/null "$URL/admin/users/$id/credits" -H "authorization: Bearer $ADMIN_TOKEN" \
        -H 'content-type: application/json' \
        -d "{\"amount\":$CREDITS,\"reason\":\"benchmark\",\"idempotency_key\":\"bench-$RUN_ID-$name\"}" \
        || { echo "bench: top-up failed for $name" >&2; return 1; }
    echo "$1 $token"
}
export -f one_user

seq 1 "$N" | xargs -P "$PARALLEL" -I{} bash -c 'one_user {}' | sort -n | cut -d' ' -f2 >"$OUT"
[ "$(grep -c . "$OUT")" -eq "$N" ] || { echo "bench: only $(grep -c . "$OUT") of $N users are ready" >&2; exit 1; }
echo "bench: wrote $N tokens to $OUT" >&2
