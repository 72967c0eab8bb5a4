# Multi-stage image for the Helm chart: build with the Rust toolchain, run on
# a slim Debian with only the binaries and their runtime libraries.
#   docker build -t llama-cluster:0.1.0 .
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake clang libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/llama-worker target/release/llama-coordinator /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libstdc++6 libgcc-s1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /data llama \
 && mkdir -p /data /var/lib/llama-cluster && chown llama /data /var/lib/llama-cluster
COPY --from=build /out/llama-worker /out/llama-coordinator /usr/local/bin/
USER llama
# P2P (TCP and QUIC/UDP), worker gRPC, coordinator HTTP and gRPC.
EXPOSE 9000/tcp 9000/udp 50051 8080 50060
ENTRYPOINT []
CMD ["llama-worker", "--help"]
