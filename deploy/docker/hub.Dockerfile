# The Tentacle hub (control plane), FROM scratch: a static `tentacle-hub`.
#
# Not buildable on its own: deploy/docker/build.sh stages the context
# (rootfs/ and home/) and passes the build arguments.
FROM scratch

COPY rootfs/ /
# home/ holds tentacle-hub/ (mode 0700): the home, owned by the user.
COPY --chown=10001:10001 home/ /var/lib/

ENV PATH=/usr/local/bin:/usr/bin:/bin \
    TENTACLE_HUB_HOME=/var/lib/tentacle-hub \
    TENTACLE_METRICS_LISTEN=127.0.0.1:9100

USER 10001:10001
WORKDIR /var/lib/tentacle-hub
VOLUME ["/var/lib/tentacle-hub"]
EXPOSE 10943

# GET /readyz on $TENTACLE_METRICS_LISTEN.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/tentacle-hub", "probe"]

ENTRYPOINT ["/usr/local/bin/tentacle-hub"]
CMD ["server", "--listen", "0.0.0.0:10943", "--from-env"]

ARG VERSION=0.0.0
ARG SOURCE=https://example.invalid/tentacle
ARG REVISION=unknown
LABEL org.opencontainers.image.title="tentacle-hub" \
      org.opencontainers.image.description="Tentacle hub: the control plane that reaches every agent, listening or polling" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
