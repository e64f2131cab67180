# Custos node image. Build the binary first (`scripts/custos --version` builds it into
# ~/.cache/custos-target/release/custos), copy it next to this file as `custos`, then:
#   docker build -t custos:local .
# (`scripts/docker-cluster up` does all of this, and makes the base image on machines that
# cannot pull it.)
FROM debian:bookworm-slim
# A fixed uid and gid (999, what `useradd --system` gave in earlier images, so their volumes
# stay writable), so a bind-mounted data directory can be given to them (chown 999:999).
RUN groupadd --system --gid 999 custos \
    && useradd --system --uid 999 --gid custos --home-dir /data custos \
    && mkdir -p /data && chown custos:custos /data
COPY custos /usr/local/bin/custos
USER custos
WORKDIR /data
VOLUME /data
# Client API, peer port.
EXPOSE 7700 7701
ENTRYPOINT ["/usr/local/bin/custos"]
CMD ["serve", "--data-dir", "/data", "--listen", "0.0.0.0:7700", "--peer-listen", "0.0.0.0:7701"]
