#!/usr/bin/env bash
# Installs what the build needs, only when missing. Safe to run again.
#   - cmake: pingora-core -> libz-ng-sys runs cmake in its build script.
#   - prometheus (prometheus + promtool): tests/prometheus.rs scrapes a running
#     proxy with a real Prometheus and checks conf/alerts.yml with promtool.
#   - cargo: the Rust toolchain (not installed here; see https://rustup.rs).
set -euo pipefail

# Installs the Debian package $2 unless the command $1 exists.
apt_install_if_missing() {
    local cmd="$1" pkg="$2"
    if command -v "$cmd" >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "dev-deps: $cmd is missing and this script is not running as root." >&2
        echo "dev-deps: install the Debian package '$pkg' (sudo apt-get install -y $pkg) and run again." >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "dev-deps: $cmd is missing and apt-get is not available; install the '$pkg' package with your package manager." >&2
        exit 1
    fi
    echo "dev-deps: installing $pkg (apt-get)..." >&2
    export DEBIAN_FRONTEND=noninteractive
    if [ -z "${DEV_DEPS_APT_UPDATED:-}" ]; then
        apt-get update -qq
        DEV_DEPS_APT_UPDATED=1
    fi
    apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
}

apt_install_if_missing cmake cmake
apt_install_if_missing prometheus prometheus
apt_install_if_missing promtool prometheus

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
        echo "dev-deps: cargo is installed in ${CARGO_HOME:-$HOME/.cargo}/bin but not on PATH; run: export PATH=\"${CARGO_HOME:-$HOME/.cargo}/bin:\$PATH\"" >&2
    else
        echo "dev-deps: cargo (the Rust toolchain) is missing; install it from https://rustup.rs (curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh)." >&2
    fi
    exit 1
fi
