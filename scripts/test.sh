#!/usr/bin/env bash
# The whole test suite: unit tests plus integration tests that start real
# PostgreSQL databases and proxy processes.
#
# PostgreSQL needs no setup here: tests/support/pg.rs uses TEST_DATABASE_URL if
# set, else postgresql://postgres@127.0.0.1:5432, else starts a private cluster
# from the machine's PostgreSQL server binaries (initdb, pg_ctl), else fails
# with a clear message.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/dev-deps.sh

# The Flowise SDK compatibility test needs its node modules, when present.
if [ -f tests/sdk/package.json ] && command -v npm >/dev/null 2>&1; then
    (cd tests/sdk && { npm ci --no-audit --no-fund || npm install --no-audit --no-fund; })
fi

cargo test --all-targets -- --test-threads=4
