#!/usr/bin/env bash
# Installs what the build needs, only when missing. Safe to run again.
#   - cmake: pingora-core -> libz-ng-sys runs cmake in its build script.
#   - cargo: the Rust toolchain (not installed here; see https://rustup.rs).
set -euo pipefail

if ! command -v cmake >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "dev-deps: cmake is missing and this script is not running as root." >&2
        echo "dev-deps: install the Debian package 'cmake' (sudo apt-get install -y cmake) and run again." >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "dev-deps: cmake is missing and apt-get is not available; install the 'cmake' package with your package manager." >&2
        exit 1
    fi
    echo "dev-deps: installing cmake (apt-get)..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends cmake >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
        echo "dev-deps: cargo is installed in ${CARGO_HOME:-$HOME/.cargo}/bin but not on PATH; run: export PATH=\"${CARGO_HOME:-$HOME/.cargo}/bin:\$PATH\"" >&2
    else
        echo "dev-deps: cargo (the Rust toolchain) is missing; install it from https://rustup.rs (curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh)." >&2
    fi
    exit 1
fi
