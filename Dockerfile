# syntax=docker/dockerfile:1
#
# One Dockerfile, one image per service binary, chosen with a build target:
#
#   docker build --target command-service -t orders/command-service:dev .
#   docker build --target query-service   -t orders/query-service:dev .
#   docker build --target projector       -t orders/projector:dev .
#
# Stages:
#   chef     - the Rust toolchain plus cargo-chef (installed through cargo, pinned)
#   planner  - reduces the workspace to a "recipe" (manifests + Cargo.lock only)
#   builder  - builds the dependencies from the recipe (a layer that stays cached
#              until Cargo.toml/Cargo.lock change), then the real sources
#   runtime  - distroless cc (glibc, CA certificates, no shell), nonroot user
#
# cargo-chef instead of hand-written dummy main.rs/lib.rs files: it follows the
# workspace as crates gain lib targets, tests or benches, with nothing to update here.
#
# Build arguments (all optional):
#   RUST_IMAGE, RUNTIME_IMAGE  base images (pin by digest in a release pipeline)
#   CARGO_CHEF_VERSION         cargo-chef version installed in the builder
#   VERSION, REVISION, CREATED OCI labels (e.g. --build-arg REVISION="$(git rev-parse HEAD)")

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS chef
ARG CARGO_CHEF_VERSION=0.1.78
# The full (not -slim) toolchain image: it carries gcc and libc6-dev (needed by ring)
# and make (tikv-jemalloc-sys builds the bundled jemalloc with configure and make),
# so nothing is installed here; TLS is rustls everywhere, so no OpenSSL is required.
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}" \
    && rm -rf "${CARGO_HOME}/registry"
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0 \
    CARGO_NET_RETRY=5

# ---------------------------------------------------------------------------
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# ---------------------------------------------------------------------------
FROM chef AS builder
# The code uses no sqlx `query!` macros (its queries are strings, checked by the tests
# against a real database), so the build needs no database and there is no `.sqlx/`
# cache. SQLX_OFFLINE keeps it so: such a macro added without a committed cache
# (`cargo sqlx prepare`) fails the build instead of looking for a database.
ENV SQLX_OFFLINE=true
COPY --from=planner /src/recipe.json recipe.json
# Patched dependencies (`[patch.crates-io]`, vendor/README.md) are dependencies, not workspace
# members: the recipe does not carry them, so their real sources go in before the cook.
COPY vendor vendor
# Dependency layer: rebuilt only when a manifest, Cargo.lock or vendor/ changes.
RUN cargo chef cook --release --locked --recipe-path recipe.json \
    -p command-service -p query-service -p projector
COPY . .
RUN cargo build --release --locked --bins \
        -p command-service -p query-service -p projector \
    && mkdir -p /out \
    && cp target/release/command-service target/release/query-service target/release/projector /out/

# ---------------------------------------------------------------------------
# Common runtime base: distroless has no shell and no package manager; the
# `nonroot` tag runs as uid/gid 65532.
FROM ${RUNTIME_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.vendor="orders" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
ENV LOG_FORMAT=json \
    RUST_LOG=info
USER 65532:65532
WORKDIR /home/nonroot

# ---------------------------------------------------------------------------
FROM runtime AS command-service
LABEL org.opencontainers.image.title="command-service" \
      org.opencontainers.image.description="Order write API and outbox relay (event-sourced order system)"
COPY --from=builder --chown=0:0 --chmod=0755 /out/command-service /usr/local/bin/command-service
ENV LISTEN_ADDR=0.0.0.0:8080
EXPOSE 8080
# No curl in the image: the binary probes its own /healthz over plain TCP.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/command-service", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/command-service"]

# ---------------------------------------------------------------------------
FROM runtime AS query-service
LABEL org.opencontainers.image.title="query-service" \
      org.opencontainers.image.description="Order read API, history and time travel (event-sourced order system)"
COPY --from=builder --chown=0:0 --chmod=0755 /out/query-service /usr/local/bin/query-service
ENV LISTEN_ADDR=0.0.0.0:8081
EXPOSE 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/query-service", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/query-service"]

# ---------------------------------------------------------------------------
# Last stage: also what a plain `docker build .` (no --target) produces.
FROM runtime AS projector
LABEL org.opencontainers.image.title="projector" \
      org.opencontainers.image.description="Read-model projector and its admin commands (event-sourced order system)"
COPY --from=builder --chown=0:0 --chmod=0755 /out/projector /usr/local/bin/projector
ENV LISTEN_ADDR=0.0.0.0:8082
EXPOSE 8082
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/projector", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/projector"]
