# strata as a sidecar: one daemon per VM, serving that VM's disk on a socket in a shared volume.
#   docker build -t strata .
#   docker run -v /var/lib/vms/vm1:/data -v /run/vm1:/run/strata strata \
#       serve /data/disk.img --socket /run/strata/disk.sock
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin strata

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home strata \
    && mkdir -p /run/strata /data && chown strata /run/strata /data
COPY --from=build /src/target/release/strata /usr/local/bin/strata
USER strata
VOLUME ["/run/strata", "/data"]
WORKDIR /data
ENTRYPOINT ["/usr/local/bin/strata"]
CMD ["serve", "/data/strata-disk.img", "--socket", "/run/strata/strata.sock"]
