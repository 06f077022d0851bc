# graphgate image: multi-stage release build, slim non-root runtime without a shell tool set
# beyond Debian's base (no curl: the health check is `graphgate healthcheck`).
#
#   docker build -t graphgate .
#   docker run -p 8080:8080 -p 9090:9090 \
#     -e GRAPHGATE_SYSTEM_USER_TOKEN=... -e GRAPHGATE_APP_SECRET=... \
#     -e GRAPHGATE_CLIENTS_FILE=/run/secrets/clients.toml -v $PWD/clients.toml:/run/secrets/clients.toml:ro \
#     graphgate
#
# Configuration comes from the environment (GRAPHGATE_<SECTION>__<KEY>, see
# docs/deployment.md), optionally on top of a file given with GRAPHGATE_CONFIG or --config;
# nothing secret is in the image. The image is built without graphgate's `demo` feature, so
# the simulated Graph API is not in it; `--build-arg FEATURES=demo` builds an image whose
# binary also has the `demo` and `fake-graph` commands (docker-compose.yml's simulated Graph:
# `graphgate fake-graph --listen 0.0.0.0:8081`).
#
# Checked by tests/it/deploy.rs: the rules below (pinned bases, non-root, no secrets,
# health check, 0.0.0.0), and the build stage run in a directory holding only what it COPYs.

FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src
# Cargo features on top of none: empty for the production image, `demo` for the simulated
# Graph API's image, `otlp` for OpenTelemetry span export (docs/observability.md).
ARG FEATURES=""
# Manifests of the workspace (graphgate and its member fake-graph) and the declared bench
# targets first (cargo needs every [[bench]] file to load the manifest), with placeholder
# sources: this layer compiles the dependencies and is cached across source edits.
COPY Cargo.toml Cargo.lock ./
COPY fake-graph/Cargo.toml ./fake-graph/
COPY benches ./benches
RUN mkdir -p src fake-graph/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs fake-graph/src/lib.rs \
    && cargo build --release --locked -p graphgate --no-default-features --features "$FEATURES" --bin graphgate \
    && rm -rf src fake-graph/src
COPY src ./src
COPY fake-graph/src ./fake-graph/src
# Make cargo see the real sources as newer than the placeholders.
RUN touch src/main.rs src/lib.rs fake-graph/src/lib.rs \
    && cargo build --release --locked -p graphgate --no-default-features --features "$FEATURES" --bin graphgate \
    && cp target/release/graphgate graphgate

FROM debian:12.12-slim AS runtime
RUN groupadd --system --gid 10001 graphgate \
    && useradd --system --uid 10001 --gid graphgate --no-create-home --shell /usr/sbin/nologin graphgate
COPY --from=build /src/graphgate /usr/local/bin/graphgate
# Listen on every interface inside the container (the defaults are loopback-only).
ENV GRAPHGATE_SERVER__LISTEN=0.0.0.0:8080 \
    GRAPHGATE_SERVER__ADMIN_LISTEN=0.0.0.0:9090 \
    GRAPHGATE_LOG__FORMAT=json
WORKDIR /var/lib/graphgate
USER 10001:10001
# 8080: public listener; 9090: admin listener (/metrics, /healthz, /readyz, /admin/*).
EXPOSE 8080 9090
# GET /readyz on the admin listener (its address from the same environment); no curl needed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/graphgate", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/graphgate"]
CMD ["serve"]
