# The Tentacle agent, FROM scratch: a static `tentacle`, /bin/bash from
# Debian's bash-static, busybox-static as /bin/sh and the usual tools (so
# that deployment scripts run as they do on a host) and tini-static as init.
#
# Not buildable on its own: deploy/docker/build.sh stages the context
# (rootfs/ and home/) and passes the build arguments.
FROM scratch

COPY rootfs/ /
# home/ holds tentacle/ (mode 0700): the home, owned by the user.
COPY --chown=10001:10001 home/ /var/lib/

ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin \
    TENTACLE_HOME=/var/lib/tentacle \
    TENTACLE_METRICS_LISTEN=127.0.0.1:9100

USER 10001:10001
WORKDIR /var/lib/tentacle
VOLUME ["/var/lib/tentacle"]
EXPOSE 10933

# GET /readyz on $TENTACLE_METRICS_LISTEN; mTLS stays the only way in for calls.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/tentacle", "probe"]

# tini (Debian's tini-static) runs as PID 1: it reaps orphaned processes that
# scripts leave behind and forwards SIGTERM to tentacle, which lets running
# scripts finish within the stop grace period. -s: subreaper when not PID 1
# (e.g. under `docker run --init`).
ENTRYPOINT ["/usr/bin/tini", "-s", "--", "/usr/local/bin/tentacle"]
CMD ["run", "--from-env"]

ARG VERSION=0.0.0
ARG SOURCE=https://example.invalid/tentacle
ARG REVISION=unknown
LABEL org.opencontainers.image.title="tentacle-agent" \
      org.opencontainers.image.description="Tentacle deployment agent: runs scripts and moves files for a trusted control plane" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
