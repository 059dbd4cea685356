# An HTTP CONNECT proxy for Tentacle's container tests, FROM scratch: Debian's
# tinyproxy binary, the shared libraries `ldd` lists for it, and
# tinyproxy.conf (port 8888, CONNECT to 10943 from private ranges, logs on
# stdout). For tests only.
#
# Not buildable on its own: deploy/docker/build.sh stages the context.
FROM scratch

COPY rootfs/ /

ENV PATH=/usr/bin:/bin
USER 10001:10001
EXPOSE 8888

# -d: stay in the foreground.
ENTRYPOINT ["/usr/bin/tinyproxy", "-d", "-c", "/etc/tinyproxy/tinyproxy.conf"]

ARG VERSION=0.0.0
ARG SOURCE=https://example.invalid/tentacle
ARG REVISION=unknown
LABEL org.opencontainers.image.title="tentacle-test-proxy" \
      org.opencontainers.image.description="tinyproxy (Debian) for Tentacle's container tests: CONNECT to 10943 only" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
