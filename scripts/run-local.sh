#!/usr/bin/env bash
# Runs flowise-proxy on this machine, from a fresh checkout:
#   1. installs build dependencies if missing (scripts/dev-deps.sh) and builds
#      the release binary;
#   2. when DATABASE_URL is unset, provides a PostgreSQL: a database
#      `flowise_proxy` on 127.0.0.1:5432 if a server answers there, else a
#      private cluster under .local/pg on 127.0.0.1:5499;
#   3. when JWT_SECRET_KEY is unset, generates one (kept in .local/jwt_secret);
#   4. writes these settings to .local/flowise-proxy.env, the settings file
#      every `flowise-proxy` command reads by default from this directory (so
#      `flowise-proxy user list` works in a new shell), and links the binary
#      as .local/bin/flowise-proxy;
#   5. migrates, creates an `admin` user on first run (prints its password);
#   6. execs `flowise-proxy serve -c conf/flowise-proxy.yaml`.
# Environment variables override .local/flowise-proxy.env, which overrides
# conf/flowise-proxy.yaml (see README.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
LOCAL="$ROOT/.local"
BIN="$ROOT/target/release/flowise-proxy"
CONF="$ROOT/conf/flowise-proxy.yaml"

log() { echo "run-local: $*" >&2; }
die() { echo "run-local: $*" >&2; exit 1; }

bash scripts/dev-deps.sh
log "building the release binary (first build takes a few minutes)..."
cargo build --release
mkdir -p "$LOCAL"

# A PostgreSQL program: from PATH, else the newest /usr/lib/postgresql/*/bin.
pgbin() {
    local name="$1" found
    if found="$(command -v "$name" 2>/dev/null)"; then
        echo "$found"
        return 0
    fi
    found="$(ls -d /usr/lib/postgresql/*/bin/"$name" 2>/dev/null | sort -V | tail -n 1 || true)"
    [ -n "$found" ] && [ -x "$found" ] && echo "$found"
}

# Runs a command as the PostgreSQL owner: `postgres` when we are root.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

port_answers() { # host port
    local isready
    if isready="$(pgbin pg_isready)"; then
        "$isready" -q -h "$1" -p "$2" -t 2 >/dev/null 2>&1
    else
        timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" >/dev/null 2>&1
    fi
}

# Creates database flowise_proxy on HOST PORT as user postgres unless it exists.
ensure_db() { # host port
    local psql
    psql="$(pgbin psql)" || die "PostgreSQL answers on $1:$2 but psql is not installed; install postgresql-client or set DATABASE_URL"
    local exists
    exists="$(PGCONNECT_TIMEOUT=5 "$psql" -w -h "$1" -p "$2" -U postgres -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'flowise_proxy'")" \
        || die "cannot log in to PostgreSQL on $1:$2 as user postgres without a password; set DATABASE_URL=postgresql://USER:PASSWORD@$1:$2/DB and run again"
    if [ "$exists" != "1" ]; then
        local out
        if ! out="$(PGCONNECT_TIMEOUT=5 "$psql" -w -h "$1" -p "$2" -U postgres -d postgres -c 'CREATE DATABASE flowise_proxy' 2>&1)"; then
            case "$out" in
                *"already exists"*) ;;
                *) die "cannot create database flowise_proxy on $1:$2: $out" ;;
            esac
        fi
        log "created database flowise_proxy on $1:$2"
    fi
}

start_private_cluster() {
    local initdb pg_ctl
    initdb="$(pgbin initdb)" || true
    pg_ctl="$(pgbin pg_ctl)" || true
    if [ -z "$initdb" ] || [ -z "$pg_ctl" ]; then
        die "no PostgreSQL found: nothing answers on 127.0.0.1:5432 and no PostgreSQL server binaries (initdb, pg_ctl) are installed. Install them (apt-get install -y postgresql) or set DATABASE_URL=postgresql://... and run again."
    fi
    local pgdir="$LOCAL/pg" data="$LOCAL/pg/data" sock="$LOCAL/pg/sock"
    mkdir -p "$pgdir" "$sock"
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 || die "running as root, but there is no 'postgres' OS user to own the private cluster; create one (useradd -r postgres) or set DATABASE_URL"
        chown -R postgres: "$pgdir"
        runuser -u postgres -- test -x "$pgdir" \
            || die "user postgres cannot reach $pgdir (a parent directory is private); move the checkout or set DATABASE_URL"
    fi
    if [ ! -f "$data/PG_VERSION" ]; then
        log "initialising a private PostgreSQL cluster in $data"
        as_pg "$initdb" -D "$data" -U postgres --auth=trust -E UTF8 >"$pgdir/initdb.log" 2>&1 \
            || die "initdb failed; see $pgdir/initdb.log"
    fi
    if ! as_pg "$pg_ctl" -D "$data" status >/dev/null 2>&1; then
        log "starting the private PostgreSQL on 127.0.0.1:5499"
        as_pg "$pg_ctl" -D "$data" -l "$pgdir/postgres.log" -w -t 30 \
            -o "-p 5499 -c listen_addresses=127.0.0.1 -k $sock" start >/dev/null \
            || die "the private PostgreSQL did not start; see $pgdir/postgres.log"
    fi
    ensure_db 127.0.0.1 5499
    log "private PostgreSQL keeps running after the proxy stops; stop it with: $(if [ "$(id -u)" -eq 0 ]; then echo "runuser -u postgres -- "; fi)$pg_ctl -D $data stop"
}

if [ -z "${DATABASE_URL:-}" ]; then
    if port_answers 127.0.0.1 5432; then
        ensure_db 127.0.0.1 5432
        export DATABASE_URL="postgresql://postgres@127.0.0.1:5432/flowise_proxy"
    else
        start_private_cluster
        export DATABASE_URL="postgresql://postgres@127.0.0.1:5499/flowise_proxy"
    fi
    log "DATABASE_URL=$DATABASE_URL"
fi

random_b64() {
    if command -v openssl >/dev/null 2>&1; then
        openssl rand -base64 "$1"
    else
        head -c "$1" /dev/urandom | base64
    fi
}

if [ -z "${JWT_SECRET_KEY:-}" ]; then
    if [ ! -s "$LOCAL/jwt_secret" ]; then
        (umask 077 && random_b64 48 | tr -d '\n' >"$LOCAL/jwt_secret")
        log "generated a JWT secret in .local/jwt_secret"
    fi
    JWT_SECRET_KEY="$(cat "$LOCAL/jwt_secret")"
    export JWT_SECRET_KEY
fi

export FLOWISE_API_URL="${FLOWISE_API_URL:-http://localhost:3000}"
PORT="${PORT:-8000}"
export PORT

# The settings file the CLI and the server read when started from this
# directory: what this script chose, nothing that conf/flowise-proxy.yaml
# already says (so editing the YAML keeps working).
write_settings() {
    local tmp="$LOCAL/flowise-proxy.env.tmp"
    (
        umask 077
        {
            echo "# Written by scripts/run-local.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ); read by every"
            echo "# flowise-proxy command started in $ROOT (see README.md, Configuration)."
            echo "# Environment variables override these lines; these override the YAML file."
            echo "FLOWISE_PROXY_CONF='$CONF'"
            echo "DATABASE_URL='$DATABASE_URL'"
            if [ -s "$LOCAL/jwt_secret" ] && [ "$JWT_SECRET_KEY" = "$(cat "$LOCAL/jwt_secret")" ]; then
                echo "JWT_SECRET_KEY='$JWT_SECRET_KEY'"
            fi
            if [ "$FLOWISE_API_URL" != "http://localhost:3000" ]; then
                echo "FLOWISE_API_URL='$FLOWISE_API_URL'"
            fi
        } >"$tmp"
    )
    mv "$tmp" "$LOCAL/flowise-proxy.env"
}
write_settings
log "settings written to .local/flowise-proxy.env"
mkdir -p "$LOCAL/bin"
ln -sfn "$BIN" "$LOCAL/bin/flowise-proxy"

"$BIN" migrate

if ! "$BIN" user list | awk -F'\t' '$2 == "admin" || $3 == "admin" { found = 1 } END { exit !found }'; then
    ADMIN_PW="$(random_b64 18 | tr -d '\n')"
    printf '%s\n' "$ADMIN_PW" | "$BIN" user add admin --role admin --credits 100
    (umask 077 && printf '%s\n' "$ADMIN_PW" >"$LOCAL/admin_password")
    cat <<MSG

  Admin user created (password also saved in .local/admin_password):
    username: admin
    password: $ADMIN_PW

  Log in and list chatflows:
    curl -s localhost:$PORT/chat/authenticate -H 'content-type: application/json' \\
         -d '{"username":"admin","password":"$ADMIN_PW"}'
    TOKEN=\$(curl -s localhost:$PORT/chat/authenticate -H 'content-type: application/json' \\
         -d '{"username":"admin","password":"$ADMIN_PW"}' | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')
    curl -s localhost:$PORT/chatflows/ -H "Authorization: Bearer \$TOKEN"

MSG
fi

log "serving on port $PORT, Flowise at $FLOWISE_API_URL (health: curl -s localhost:$PORT/health)"
log "the CLI in another shell, from $ROOT: export PATH=\"$LOCAL/bin:\$PATH\"; flowise-proxy user list"
exec "$BIN" serve -c "$CONF"
