# Tentacle's load simulator, FROM scratch: a static `tentacle-sim`.
# Its working directory (where `run` writes reports) is writable by 10001.
#
# Not buildable on its own: deploy/docker/build.sh stages the context
# (rootfs/ and home/) and passes the build arguments.
FROM scratch

COPY rootfs/ /
# home/ holds tentacle-sim/ (mode 0700): the home, owned by the user.
COPY --chown=10001:10001 home/ /var/lib/

ENV PATH=/usr/local/bin:/usr/bin:/bin \
    TENTACLE_SIM_HOME=/var/lib/tentacle-sim

USER 10001:10001
WORKDIR /var/lib/tentacle-sim

ENTRYPOINT ["/usr/local/bin/tentacle-sim"]
CMD ["--help"]

ARG VERSION=0.0.0
ARG SOURCE=https://example.invalid/tentacle
ARG REVISION=unknown
LABEL org.opencontainers.image.title="tentacle-sim" \
      org.opencontainers.image.description="Tentacle load simulator: virtual tentacles, scenarios, chaos, invariants and reports" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
