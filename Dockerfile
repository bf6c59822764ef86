# Kaleidoscope Host: the binary and the shipped plugins in one image.
#   docker build -t kaleidoscope .
#   docker run --env DATABASE_URL=... --env REDIS_URL=... -p 9464:9464 kaleidoscope
# Settings are environment variables (README "Configuration"); tests/e2e/deployment.rs checks
# every one set here against the code.

FROM rust:1.95-bookworm AS build
RUN rustup target add wasm32-wasip2
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin kaleidoscope \
 && ./scripts/build-plugins --rust-only

FROM debian:bookworm-slim
RUN useradd --system --create-home --home-dir /var/lib/kaleidoscope kaleidoscope \
 && mkdir -p /etc/kaleidoscope/migrations
COPY --from=build /src/target/release/kaleidoscope /usr/local/bin/kaleidoscope
# The shipped plugins, owned by the host's user: the host writes the fleet's deployed plugins
# (`kaleidoscope plugin deploy`, kept in PostgreSQL) beside them. A new image brings new shipped
# plugins; deployed ones come from the store whatever the image holds.
COPY --from=build --chown=kaleidoscope:kaleidoscope /src/target/plugins /opt/kaleidoscope/plugins
# The operator's configuration file (grants, limits) and migrations: mount over these (an empty
# file and directory are fine).
RUN touch /etc/kaleidoscope/kaleidoscope.toml
ENV KALEIDOSCOPE_PLUGINS_DIR=/opt/kaleidoscope/plugins \
    KALEIDOSCOPE_CONFIG=/etc/kaleidoscope/kaleidoscope.toml \
    KALEIDOSCOPE_MIGRATIONS_DIR=/etc/kaleidoscope/migrations \
    KALEIDOSCOPE_CACHE_DIR=/var/lib/kaleidoscope/cache \
    KALEIDOSCOPE_HTTP_ADDR=0.0.0.0:9464 \
    KALEIDOSCOPE_WAIT_FOR_DEPS_MS=60000
USER kaleidoscope
WORKDIR /var/lib/kaleidoscope
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/kaleidoscope"]
CMD ["run"]
