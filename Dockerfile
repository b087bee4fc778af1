# syntax=docker/dockerfile:1
# tokenwarden production image: a multi-stage build; the runtime stage is debian:bookworm-slim
# with only CA certificates and the binary, running as an unprivileged user.
# Migrations and config/default.toml are compiled into the binary.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds; the binary is copied out
# because the target cache is not part of the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tokenwarden \
 && install -D -m 0755 target/release/tokenwarden /out/tokenwarden

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tokenwarden \
 && useradd --system --uid 10001 --gid tokenwarden --no-create-home --shell /usr/sbin/nologin tokenwarden
COPY --from=build /out/tokenwarden /usr/local/bin/tokenwarden
USER 10001:10001
# The operations endpoint (/healthz, /readyz, /metrics) must listen beyond loopback in a container.
ENV TOKENWARDEN__HTTP__LISTEN=0.0.0.0:9464 \
    TOKENWARDEN__TELEMETRY__FORMAT=json
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/tokenwarden"]
CMD ["run"]
