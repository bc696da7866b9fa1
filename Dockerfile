# batchline image: `batchline run` by default; `batchline sim ...` and
# `batchline send ...` work too (the CLI is the entrypoint).
#
#   docker build -t batchline .
#   docker run --rm batchline --help

############################ build ############################
FROM rust:1-bookworm AS build

# librdkafka is built from source (rdkafka's cmake-build feature) and links
# system OpenSSL (its ssl feature) and zlib.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      cmake libcurl4-openssl-dev zlib1g-dev libssl-dev pkg-config g++ \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# Dependencies first, against stub sources: this layer (librdkafka's build is
# the slow part) is reused until Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src config \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs config/default.toml \
 && cargo build --release --locked \
 && rm -rf src config

# The crate itself. COPY keeps the files' modification times, which can be
# older than the stubs', so touch them or cargo would keep the stub build.
# config/default.toml is compiled into the binary (include_str!).
COPY config ./config
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && cp target/release/batchline /usr/local/bin/batchline

########################### runtime ###########################
FROM debian:bookworm-slim

# libssl3: the binary links system OpenSSL (rdkafka's ssl feature); zlib1g and
# libgcc-s1 are already part of the base image. ca-certificates: the system
# roots librdkafka (OpenSSL) verifies TLS brokers with; the HTTP client
# (reqwest with rustls) carries its own webpki roots.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 batchline \
 && useradd --system --uid 10001 --gid batchline \
      --home-dir /var/lib/batchline --shell /usr/sbin/nologin batchline \
 && mkdir -p /var/lib/batchline/spool \
 && chown -R batchline:batchline /var/lib/batchline

COPY --from=build /usr/local/bin/batchline /usr/local/bin/batchline

# The default spool.dir ("./spool") resolves to /var/lib/batchline/spool.
# Mount a volume there to keep open windows and results across restarts.
WORKDIR /var/lib/batchline
USER 10001:10001

# 9464: metrics, health and status API (set BATCHLINE__HTTP__LISTEN=0.0.0.0:9464,
# the default listens on 127.0.0.1 only). 8089: `batchline sim`.
EXPOSE 9464 8089

ENTRYPOINT ["batchline"]
CMD ["run"]
