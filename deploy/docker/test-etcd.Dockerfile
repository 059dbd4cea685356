# A one-member etcd for Tentacle's container tests of the hub cluster, FROM
# scratch: Debian's etcd binary and the shared libraries `ldd` lists for it.
# Its data lives in /var/lib/etcd (an anonymous volume, removed with the
# container). For tests only.
#
# Not buildable on its own: deploy/docker/build.sh stages the context.
FROM scratch

COPY rootfs/ /
# home/ holds etcd/ (mode 0700, as etcd wants its data directory).
COPY --chown=10001:10001 home/ /var/lib/

ENV PATH=/usr/bin:/bin
USER 10001:10001
WORKDIR /var/lib/etcd
VOLUME ["/var/lib/etcd"]
EXPOSE 2379

ENTRYPOINT ["/usr/bin/etcd"]
CMD ["--data-dir", "/var/lib/etcd/data"]

ARG VERSION=0.0.0
ARG SOURCE=https://example.invalid/tentacle
ARG REVISION=unknown
LABEL org.opencontainers.image.title="tentacle-test-etcd" \
      org.opencontainers.image.description="etcd (Debian) for Tentacle's container tests of the hub cluster" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
