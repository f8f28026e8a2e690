# syntax=docker/dockerfile:1
# flowise-proxy container image.
#
# Base images are pinned by version tag and digest. The digests were taken
# from public Dockerfiles that pin the same tags (no registry could be queried
# where this was written): check them with `docker buildx imagetools inspect
# IMAGE:TAG` and refresh tag and digest together.
#
#   docker build -t flowise-proxy .

# ---- build ----
# Rust 1.95: the locked dependencies need it (parking_lot 0.13).
FROM rust:1.95.0-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS builder
# pingora-core -> libz-ng-sys needs cmake at build time. Package versions are
# not pinned (DL3008): the digest pins the Debian release, and Debian drops
# superseded versions from its mirrors after each security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# 1. Dependencies only: the manifests and an empty program. This layer is
#    rebuilt only when Cargo.toml or Cargo.lock change, so a change to src/
#    compiles flowise-proxy alone, not its ~300 dependencies.
COPY Cargo.toml Cargo.lock ./
# Patched dependencies ([patch.crates-io] in Cargo.toml; vendor/README.md).
COPY vendor ./vendor
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && cargo build --release --locked \
 && rm -rf src

# 2. The program (migrations/ is embedded at compile time). `touch`: COPY keeps
#    the files' old modification times, which cargo would take for "unchanged
#    since the empty program was built".
COPY migrations ./migrations
COPY src ./src
RUN touch src/main.rs \
 && cargo build --release --locked \
 && ./target/release/flowise-proxy --version

# ---- runtime ----
FROM debian:bookworm-20260824-slim@sha256:88200866dfff7ea7f5cbcb6ec7c8a701889efe6fe859fe64d6990e4b07ea4171
# curl: the health check below. (Versions not pinned: see the builder stage.)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin flowise-proxy
COPY --from=builder /src/target/release/flowise-proxy /usr/local/bin/flowise-proxy
COPY conf/flowise-proxy.yaml /etc/flowise-proxy/flowise-proxy.yaml
USER 10001:10001
# Listen on all interfaces inside the container; secrets (JWT_SECRET_KEY,
# FLOWISE_API_KEY, DATABASE_URL) come from the environment at run time.
# FLOWISE_PROXY_CONF makes every command (serve and the admin CLI run with
# `docker exec`) read the same YAML file without -c.
ENV HOST=0.0.0.0 \
    PORT=8000 \
    METRICS_ADDR=0.0.0.0:9464 \
    FLOWISE_PROXY_CONF=/etc/flowise-proxy/flowise-proxy.yaml
EXPOSE 8000 9464
# Liveness of the proxy itself: `GET /` answers 200 whenever the process
# serves, whatever the state of Flowise or the database. Readiness (database
# and Flowise reachable, not draining) stays on /health for load balancers;
# a Flowise outage must not make the orchestrator restart healthy proxies.
# Through a shell so that a PORT given at run time is followed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/bin/sh", "-c", "curl -fsS -o /dev/null \"http://127.0.0.1:${PORT:-8000}/\" || exit 1"]
# SIGTERM drains (health 503 at once, in-flight streams finish, exit 0).
STOPSIGNAL SIGTERM
ENTRYPOINT ["flowise-proxy"]
CMD ["serve"]
