# flowise-proxy container image.
# NOTE: written without a Docker engine available; it has not been built here.

# ---- build ----
FROM rust:1-bookworm AS builder
# pingora-core -> libz-ng-sys needs cmake at build time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked

# ---- runtime ----
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin flowise-proxy
COPY --from=builder /src/target/release/flowise-proxy /usr/local/bin/flowise-proxy
COPY conf/ /etc/flowise-proxy/
USER flowise-proxy
# Listen on all interfaces inside the container; secrets (JWT_SECRET_KEY,
# FLOWISE_API_KEY, DATABASE_URL) come from the environment at run time.
ENV HOST=0.0.0.0 PORT=8000 METRICS_ADDR=0.0.0.0:9464
EXPOSE 8000 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8000/health || exit 1
# SIGTERM drains (health 503 at once, in-flight streams finish, exit 0).
STOPSIGNAL SIGTERM
ENTRYPOINT ["flowise-proxy"]
CMD ["serve", "-c", "/etc/flowise-proxy/flowise-proxy.yaml"]
