# graphgate image: multi-stage build, slim non-root runtime.
#   docker build -t graphgate .
#   docker run -p 8080:8080 -v $PWD/config/graphgate.toml:/etc/graphgate/graphgate.toml graphgate
# The same image runs the simulated Graph API: `graphgate fake-graph --listen 0.0.0.0:8081`.

FROM rust:1 AS build
WORKDIR /src
# Manifests first so the dependency layer is cached across source edits.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && echo '' > src/lib.rs \
    && echo 'fn main() {}' > benches/hot_paths.rs \
    && cargo build --release --locked --bin graphgate \
    && rm -rf src benches
COPY src ./src
COPY benches ./benches
# Make cargo see the real sources as newer than the placeholder build.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin graphgate \
    && cp target/release/graphgate /usr/local/bin/graphgate

FROM debian:bookworm-slim AS runtime
# curl for the HEALTHCHECK; no CA bundle is needed (rustls carries webpki roots).
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 graphgate \
    && useradd --system --uid 10001 --gid graphgate --no-create-home --shell /usr/sbin/nologin graphgate
COPY --from=build /usr/local/bin/graphgate /usr/local/bin/graphgate
COPY config/graphgate.toml /etc/graphgate/graphgate.toml
ENV GRAPHGATE_CONFIG=/etc/graphgate/graphgate.toml
USER 10001:10001
# 8080: public listener; 9090: admin listener (/metrics, /healthz, /readyz).
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9090/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/graphgate"]
CMD ["serve"]
