# An ordinary multi-stage build of Tentacle's images, for machines that can
# pull base images from a registry (Docker Hub here: rust and debian).
#
#   NOT BUILDABLE ON THE PROJECT'S OWN CI MACHINE: it has no registry, so
#   `FROM rust:…` and `FROM debian:…` cannot be pulled there. The project
#   builds its images with deploy/docker/build.sh (FROM scratch) instead.
#
# From the repository's root, one target per image:
#
#   docker build -f deploy/docker/multistage.Dockerfile --target agent -t tentacle-agent:0.1.0 .
#   docker build -f deploy/docker/multistage.Dockerfile --target hub   -t tentacle-hub:0.1.0 .
#   docker build -f deploy/docker/multistage.Dockerfile --target sim   -t tentacle-sim:0.1.0 .
#
# The runtime images match build.sh's: user 10001:10001, the same homes,
# environment, entry points, commands and health checks; they are bigger
# (Debian's slim base, ~75 MB) and get glibc and security updates from Debian.
# BuildKit reads multistage.Dockerfile.dockerignore beside this file, which
# keeps target/ out of the context; the legacy builder does not.

ARG RUST_VERSION=1.88
ARG DEBIAN_RELEASE=bookworm

# --- build ------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# protoc comes from the protoc-bin-vendored crate; nothing else is needed.
# With BuildKit, add `--mount=type=cache,target=/usr/local/cargo/registry
# --mount=type=cache,target=/src/target` to RUN to keep builds incremental.
RUN cargo build --release --locked --bins \
 && install -D -m 0755 -t /out \
        target/release/tentacle target/release/tentacle-hub target/release/tentacle-sim

# --- a base for the runtime images -------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
ARG VERSION=0.1.0
ARG SOURCE=https://example.invalid/tentacle
RUN groupadd --gid 10001 tentacle \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/tentacle \
        --shell /bin/bash tentacle
LABEL org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"

# --- agent: bash and coreutils from Debian for scripts, tini as PID 1 ----------------------
FROM runtime AS agent
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/tentacle
COPY --from=build /out/tentacle /usr/local/bin/tentacle
ENV TENTACLE_HOME=/var/lib/tentacle \
    TENTACLE_METRICS_LISTEN=127.0.0.1:9100
USER 10001:10001
WORKDIR /var/lib/tentacle
VOLUME ["/var/lib/tentacle"]
EXPOSE 10933
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/tentacle", "probe"]
ENTRYPOINT ["/usr/bin/tini", "-s", "--", "/usr/local/bin/tentacle"]
CMD ["run", "--from-env"]
LABEL org.opencontainers.image.title="tentacle-agent" \
      org.opencontainers.image.description="Tentacle deployment agent: runs scripts and moves files for a trusted control plane"

# --- hub ---------------------------------------------------------------------------------
FROM runtime AS hub
RUN install -d -o 10001 -g 10001 -m 0700 /var/lib/tentacle-hub
COPY --from=build /out/tentacle-hub /usr/local/bin/tentacle-hub
ENV TENTACLE_HUB_HOME=/var/lib/tentacle-hub \
    TENTACLE_METRICS_LISTEN=127.0.0.1:9100
USER 10001:10001
WORKDIR /var/lib/tentacle-hub
VOLUME ["/var/lib/tentacle-hub"]
EXPOSE 10943
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/tentacle-hub", "probe"]
ENTRYPOINT ["/usr/local/bin/tentacle-hub"]
CMD ["server", "--listen", "0.0.0.0:10943", "--from-env"]
LABEL org.opencontainers.image.title="tentacle-hub" \
      org.opencontainers.image.description="Tentacle hub: the control plane that reaches every agent, listening or polling"

# --- simulator -----------------------------------------------------------------------------
FROM runtime AS sim
RUN install -d -o 10001 -g 10001 -m 0700 /var/lib/tentacle-sim
COPY --from=build /out/tentacle-sim /usr/local/bin/tentacle-sim
ENV TENTACLE_SIM_HOME=/var/lib/tentacle-sim
USER 10001:10001
WORKDIR /var/lib/tentacle-sim
ENTRYPOINT ["/usr/local/bin/tentacle-sim"]
CMD ["--help"]
LABEL org.opencontainers.image.title="tentacle-sim" \
      org.opencontainers.image.description="Tentacle load simulator: virtual tentacles, scenarios, chaos, invariants and reports"
