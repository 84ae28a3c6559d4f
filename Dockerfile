# syntax=docker/dockerfile:1
# Pushwire image: both binaries, /usr/local/bin/control-plane and /usr/local/bin/worker, on a
# distroless base (glibc, CA certificates, no shell), run as the unprivileged user nonroot
# (65532). The Helm chart in helm/pushwire picks the binary with `command`.
#
#   docker build -t pushwire:0.1.0 .
#   docker run --rm -p 50051:50051 pushwire:0.1.0 --grpc-addr 0.0.0.0:50051 --with-worker
#   docker run --rm --entrypoint /usr/local/bin/worker pushwire:0.1.0 --help

# The workspace's rust-version; any newer Rust builds it too.
ARG RUST_VERSION=1.90

FROM rust:${RUST_VERSION}-bookworm AS build
# etcd-client's build script runs protoc on etcd's protos.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Stripped release binaries: every crate is linked in statically; only glibc and libgcc come
# from the runtime image (distroless "cc", the same Debian release as this builder).
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p pushwire-control-plane -p pushwire-worker \
        -p pushwire-common --bin control-plane --bin worker --bin publish \
 && install -D -m 0755 target/release/control-plane /out/control-plane \
 && install -D -m 0755 target/release/worker /out/worker \
 && install -D -m 0755 target/release/publish /out/publish

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/control-plane /out/worker /out/publish /usr/local/bin/
USER 65532:65532
# The embedded store's default --data-dir, ./pushwire-data, lands in the user's home.
WORKDIR /home/nonroot
# control plane: gRPC 50051, HTTP 8081; worker: gRPC 50052, HTTP 8082. Both bind 127.0.0.1 by
# default: pass --grpc-addr/--http-addr 0.0.0.0:PORT (the chart does).
EXPOSE 50051 8081 50052 8082
ENTRYPOINT ["/usr/local/bin/control-plane"]
