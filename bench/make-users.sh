#!/usr/bin/env bash
# Creates N benchmark users with the admin CLI, grants them CHATFLOW_ID, gives
# them credits, logs each in via /chat/authenticate and writes the access
# tokens, one per line, to OUT (default bench/tokens.txt).
#
#   DATABASE_URL=... bash bench/make-users.sh PROXY_URL CHATFLOW_ID [N] [OUT]
#
# Users are named bench0001..benchNNNN; existing ones are reused (grant and
# credits are applied again). CREDITS (default 1000000) per user.
# Access tokens expire after JWT_EXPIRATION_HOURS (24 h by default).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ $# -ge 2 ] || { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
URL="${1%/}"; CHATFLOW="$2"; N="${3:-1000}"; OUT="${4:-bench/tokens.txt}"
CREDITS="${CREDITS:-1000000}"
BIN="${BIN:-target/release/flowise-proxy}"
PASSWORD="${BENCH_PASSWORD:-bench-password-not-secret}"
[ -x "$BIN" ] || { echo "bench: $BIN not built (cargo build --release)" >&2; exit 1; }
[ -n "${DATABASE_URL:-}" ] || { echo "bench: set DATABASE_URL (the proxy's database)" >&2; exit 1; }

existing="$("$BIN" user list | cut -f2)"
: >"$OUT"
for i in $(seq 1 "$N"); do
    name="$(printf 'bench%04d' "$i")"
    if ! grep -qx "$name" <<<"$existing"; then
        printf '%s\n' "$PASSWORD" | "$BIN" user add "$name" --role user >/dev/null
    fi
    "$BIN" grant "$name" "$CHATFLOW" >/dev/null
    "$BIN" credits grant "$name" "$CREDITS" --reason "benchmark" >/dev/null
    token="$(curl -sf "$URL/chat/authenticate" -H 'content-type: application/json' \
        -d "{\"username\":\"$name\",\"password\":\"$PASSWORD\"}" \
        | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')"
    [ -n "$token" ] || { echo "bench: login failed for $name" >&2; exit 1; }
    echo "$token" >>"$OUT"
    if [ $((i % 100)) -eq 0 ]; then echo "bench: $i/$N users ready" >&2; fi
done
echo "bench: wrote $N tokens to $OUT" >&2
